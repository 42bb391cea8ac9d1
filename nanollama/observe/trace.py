"""The heavy profiler: torch.profiler over configured windows of global steps, chrome traces named by step.

Each window [start, stop] (profile.trace, repeated every profile.every steps) runs torch.profiler with
schedule(wait, warmup, active, repeat=0); every active span becomes one trace:

    RUN_DIR/profile/step_{first active global step:08d}/rank{r}.json.gz    chrome://tracing, ui.perfetto.dev
    RUN_DIR/profile/step_{...}/rank{r}.memory.pickle                       profile.memory=true on a GPU:
                                                                           pytorch.org/memory_viz

A run resumed inside a window starts the schedule at the step it resumed from (torch.profiler counts
from its start). Named by the global step, so a resumed run never renumbers; a file is never overwritten:
a resumed run that replays a traced step (it resumed from an earlier checkpoint) writes rank{r}.1.json.gz
beside the first.

Rank 0 appends a one-line summary of each of its traces to metrics.jsonl, its own record kind (no "loss"
or "eval_loss" key, so readers of training and eval records skip it; "step" is the last traced step, so
metrics' truncate_after on resume treats it like any record):
    {"step": 12, "kind": "trace", "trace_steps": [11, 12], "trace_file": "profile/step_00000011/rank0.json.gz",
     "trace_time": "cpu"|"cuda", "trace_span_s": wall span of the recorded events,
     "trace_top": [[op or kernel name, self seconds, share of busy time], ...] (profile.top of them),
     "trace_comm_share": communication ops' share of busy time (nccl/gloo/c10d collectives),
     "trace_idle_share": 1 - busy / span (busy: CPU ops' self time on the CPU, kernel time on a GPU),
     "trace_flops_per_step": torch.profiler's FLOP count per traced step (profile.with_flops) or null}
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from nanollama.observe.profile_config import ProfileConfig

COMM_WORDS = ("nccl", "gloo", "c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter")


def trace_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "profile" / f"step_{step:08d}"


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """stem + suffix, or stem.1 + suffix, ...: the first name not taken (traces are never overwritten)."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}.{n}{suffix}"
    return path


def summarize(prof: torch.profiler.profile, on_cuda: bool, top: int) -> dict:
    """Top ops (CPU) or kernels (GPU) by self time, communication and idle shares, FLOPs, of one trace."""
    want = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
    times: dict[str, float] = {}
    flops = 0
    for e in prof.key_averages():
        flops += e.flops or 0
        # ProfilerStep#N's self time is the step's time outside every op: idle, not busy
        if e.device_type == want and not e.key.startswith("ProfilerStep"):
            self_us = e.self_device_time_total if on_cuda else e.self_cpu_time_total
            times[e.key] = times.get(e.key, 0.0) + self_us
    busy = sum(times.values())
    events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events) if events else 0.0
    comm = sum(t for name, t in times.items() if any(w in name.lower() for w in COMM_WORDS))
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "trace_time": "cuda" if on_cuda else "cpu",
        "trace_span_s": span / 1e6,
        "trace_top": [[name, t / 1e6, t / busy if busy else 0.0] for name, t in ranked],
        "trace_comm_share": comm / busy if busy else 0.0,
        # kernels on several streams (or CPU ops on several threads) can overlap: busy may exceed the span
        "trace_idle_share": max(0.0, 1.0 - busy / span) if span else 0.0,
        "trace_flops": flops,
    }


@contextlib.contextmanager
def _quiet():
    """Silence torch's note that events are kept per cycle only: one summary per cycle is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        yield


class Tracer:
    """torch.profiler driven by global steps: begin(step) before a step, end() after it, close() at exit."""

    def __init__(
        self,
        cfg: ProfileConfig,
        run_dir: str | Path,
        rank: int,
        device: torch.device,
        write_summary: Callable[[dict], None] | None,
        info: Callable[[str], None] = print,
    ):
        self.cfg, self.run_dir, self.rank, self.device = cfg, Path(run_dir), rank, device
        self.write_summary, self.info = write_summary, info
        self.on = cfg.trace is not None and (cfg.ranks is None or rank in cfg.ranks)
        self.on_cuda = device.type == "cuda"
        self.snapshot = cfg.memory and self.on_cuda
        self._prof: torch.profiler.profile | None = None
        self._schedule = torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=0)
        self._window: tuple[int, int] | None = None
        self._origin = 0  # the global step the running profiler started at
        self._step = 0
        self._active: list[int] = []  # global steps recorded into the trace being collected
        self.recording = False  # the current step is recorded (light records say so)

    def begin(self, step: int) -> None:
        if not self.on:
            return
        self._step = step
        if self._prof is None:
            window = self.cfg.window_at(step)
            if window is None:
                return
            self._start(step, window)  # a run resumed inside a window starts its schedule here
        action = self._schedule(step - self._origin)
        self.recording = action in (
            torch.profiler.ProfilerAction.RECORD,
            torch.profiler.ProfilerAction.RECORD_AND_SAVE,
        )
        if self.recording:
            self._active.append(step)

    def end(self) -> None:
        if self._prof is None:
            return
        with _quiet():
            self._prof.step()  # after the step: the schedule's next action (a trace is saved here)
        if self._step >= self._window[1]:
            self._stop()
        self.recording = False

    def close(self) -> None:
        if self._prof is not None:
            self._stop()

    def _start(self, step: int, window: tuple[int, int]) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=self._schedule,
            on_trace_ready=self._ready,
            record_shapes=self.cfg.record_shapes,
            with_stack=self.cfg.with_stack,
            with_flops=self.cfg.with_flops,
        )
        self._window, self._origin, self._active = window, step, []
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof.start()

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        with _quiet():
            prof.stop()  # stopping mid-span saves the part recorded so far (through _ready)
        if self.snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)
        self._active, self._window = [], None

    def _export(self, prof: torch.profiler.profile, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = _free_name(folder, f"rank{self.rank}", ".json.gz")
        tmp = folder / f".tmp-{os.getpid()}-{path.name}"  # ends in .gz: torch gzips what it writes
        try:
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, path)  # a crash mid-export leaves a .tmp-*, never a torn trace under the real name
            if self.snapshot:
                snap = _free_name(folder, f"rank{self.rank}", ".memory.pickle")
                tmp = folder / f".tmp-{os.getpid()}-{snap.name}"
                torch.cuda.memory._dump_snapshot(str(tmp))
                os.replace(tmp, snap)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _ready(self, prof: torch.profiler.profile) -> None:
        steps, self._active = self._active, []
        if not steps:
            return
        try:
            path = self._export(prof, trace_dir(self.run_dir, steps[0]))
        except OSError as e:  # a full disk, say: the trace is lost, the training is not
            self.info(f"trace of steps {steps[0]}-{steps[-1]} not written ({e}); training goes on")
            return
        summary = summarize(prof, self.on_cuda, self.cfg.top)
        flops = summary.pop("trace_flops")
        record = {
            "step": steps[-1],
            "kind": "trace",
            "trace_steps": [steps[0], steps[-1]],
            "trace_file": str(path.relative_to(self.run_dir)),
            **summary,
            "trace_flops_per_step": flops / len(steps) if self.cfg.with_flops else None,
        }
        if self.write_summary is not None:
            self.write_summary(record)
        top = ", ".join(f"{name} {share:.0%}" for name, _, share in record["trace_top"][:3])
        self.info(
            f"trace of steps {steps[0]}-{steps[-1]}: {record['trace_file']} | top {top} | "
            f"comm {record['trace_comm_share']:.0%} | idle {record['trace_idle_share']:.0%}"
        )
