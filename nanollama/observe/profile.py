"""The trainer's profiler: the light per-step timer (profile.jsonl) and torch.profiler traces, behind one object.

The trainer calls, per step,

    profiler.begin(step)        before the step (the global step about to run, 1-based)
    profiler.mark("data")       the phase starting now: data, fwd_bwd, optim, monitor
    profiler.end()              after the step's logging, evaluation and checkpoint

and start(...) once after resuming, close() at exit. Marks rather than context managers so that the trainer
keeps its shape: a mark closes the running phase and opens the next. With profile.light off and no trace
window, every call returns at once (and nothing synchronises): training is unchanged.

File formats: nanollama.observe.profile_file (profile.jsonl), nanollama.observe.trace (traces and the
per-trace summary record in metrics.jsonl).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanollama.observe.metrics import MetricsFile
from nanollama.observe.profile_config import ProfileConfig
from nanollama.observe.profile_file import ProfileFile
from nanollama.observe.trace import Tracer

__all__ = ["PHASES", "Profiler", "ProfileConfig", "StepTimer", "rss_now_and_peak"]

PHASES = ("data", "fwd_bwd", "optim", "monitor")


def rss_now_and_peak() -> tuple[int, int]:
    """(current, peak) resident set size of this process: VmRSS and VmHWM from one read of /proc (0 without)."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line[:6]
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found["VmRSS:"], found["VmHWM:"]


class StepTimer:
    """Wall time per phase of one step; `sync` (the GPU's synchronize) runs at each boundary of a timed step."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.on = False
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._phase, self._last, self._start = "data", 0.0, 0.0

    def begin(self) -> None:
        self.on = True
        self.totals = dict.fromkeys(PHASES, 0.0)
        if self.sync is not None:
            self.sync()  # the previous step's queued work is not this step's
        self._phase = "data"
        self._start = self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.on:
            return
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.totals[self._phase] += now - self._last
        self._phase, self._last = phase, now

    def end(self) -> float:
        """Close the running phase; the step's wall time."""
        self.mark("data")
        self.on = False
        return self._last - self._start


class Profiler:
    """The light profiler and the tracer of one rank; a no-op unless the `profile` section turns one on."""

    def __init__(
        self,
        cfg: ProfileConfig,
        run_dir: str | Path,
        rank: int,
        device: torch.device,
        log_every: int,
        flops: tuple[float, float, float | None],
        metrics: MetricsFile | None,
    ):
        """flops: (model FLOPs per token, hardware FLOPs per token, the device's peak FLOP/s or None), as the
        trainer's MFU uses them. metrics: where rank 0 writes trace summaries (None on other ranks)."""
        self.cfg, self.run_dir, self.rank, self.device = cfg, Path(run_dir), rank, device
        self.every = cfg.light_every or log_every
        self.flops_per_token, self.hardware_flops_per_token, self.peak = flops
        self.metrics = metrics
        on_cuda = device.type == "cuda"
        self.timer = StepTimer((lambda: torch.cuda.synchronize(device)) if on_cuda else None)
        self.file = ProfileFile(run_dir, rank) if cfg.light else None
        self.tracer: Tracer | None = None
        self.tokens, self.world = 0, 1
        self._step = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def start(self, step: int, tokens_per_step: int, world_size: int, info: Callable[[str], None]) -> None:
        """After resuming at `step`: open profile.jsonl (dropping records past `step`), say what is profiled."""
        self.tokens, self.world = tokens_per_step, world_size
        if self.cfg.trace is not None:
            write = self.metrics.write if self.metrics is not None else None
            self.tracer = Tracer(self.cfg, self.run_dir, self.rank, self.device, write, info)
        if not self.enabled:
            return
        parts = []
        if self.file is not None:
            note = self.file.open(step)
            if note:
                info(f"profile: {note}")
            mem = "CUDA allocator stats" if self.device.type == "cuda" else "the process's RSS peak (CPU)"
            parts.append(f"light every {self.every} steps -> {self.file.path.name} (memory: {mem})")
        if self.cfg.trace is not None:
            start, stop = self.cfg.trace
            again = f", again every {self.cfg.every} steps" if self.cfg.every else ""
            c = self.cfg
            parts.append(
                f"torch.profiler over steps {start}-{stop}{again} (wait {c.wait}, warmup {c.warmup}, "
                f"active {c.active}) -> {self.run_dir / 'profile'}"
            )
            if c.memory and self.device.type != "cuda":
                parts.append("profile.memory: the CUDA memory snapshot is skipped on the CPU")
        info("profile: " + "; ".join(parts))

    def begin(self, step: int) -> None:
        if not self.enabled:
            return
        self._step = step
        if self.tracer is not None:
            self.tracer.begin(step)
        if self.file is not None and step % self.every == 0:
            self.timer.begin()

    def mark(self, phase: str) -> None:
        if self.timer.on:
            self.timer.mark(phase)

    def end(self) -> None:
        if not self.enabled:
            return
        traced = self.tracer is not None and self.tracer.recording
        if self.timer.on:
            self.file.write(self.record(self.timer.end(), traced))
        if self.tracer is not None:
            self.tracer.end()

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.close()

    def record(self, step_s: float, traced: bool) -> dict:
        """The profile.jsonl record of the step just timed (fields: nanollama.observe.profile_file)."""
        t = self.timer.totals
        train_s = max(t["data"] + t["fwd_bwd"] + t["optim"], 1e-12)
        tokens_per_s = self.tokens / train_s
        per_device = tokens_per_s / self.world
        if self.device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(self.device)
            reserved, kind = torch.cuda.memory_reserved(self.device), "cuda"
        else:
            (reserved, peak_mem), kind = rss_now_and_peak(), "rss"
        return {
            "step": self._step,
            "time": time.time(),
            "step_s": step_s,
            "data_s": t["data"],
            "fwd_bwd_s": t["fwd_bwd"],
            "optim_s": t["optim"],
            "monitor_s": t["monitor"],
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
            "tflops": per_device * self.flops_per_token / 1e12,
            "mfu": per_device * self.flops_per_token / self.peak if self.peak else None,
            "hfu": per_device * self.hardware_flops_per_token / self.peak if self.peak else None,
            "mem_peak_bytes": peak_mem,
            "mem_reserved_bytes": reserved,
            "mem_kind": kind,
            "traced": traced,
        }
