"""The `profile` config section: the light per-step profiler and torch.profiler traces (default: both off).

    profile.light=true                      per-step phase times, tokens/s, MFU/HFU, memory -> RUN_DIR/profile.jsonl
    profile.trace=[100,110] profile.every=1000   torch.profiler over global steps 100..110, again at 1100..1110, ...

Within a trace window torch.profiler's schedule (wait, warmup, active) repeats; each active span is one
chrome trace, RUN_DIR/profile/step_{first active global step:08d}/rank{r}.json.gz (nanollama.observe.trace).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanollama.utils.checks import check, is_int


@dataclass
class ProfileConfig:
    light: bool = False  # per-step phase times, tokens/s, MFU/HFU and memory to profile.jsonl
    light_every: int | None = None  # record (and on a GPU synchronise at) every N-th step; null: log.every
    trace: tuple[int, int] | None = None  # [start, stop] global steps (inclusive) under torch.profiler; null: none
    every: int = 0  # repeat the trace window every N steps (start + k * every); 0: once
    wait: int = 0  # torch.profiler schedule: steps idle at the start of each cycle within a window
    warmup: int = 1  # torch.profiler schedule: steps profiled then thrown away (the profiler's start-up cost)
    active: int = 1  # torch.profiler schedule: steps recorded into each trace
    memory: bool = False  # CUDA memory snapshot (pytorch.org/memory_viz) beside each trace; skipped on the CPU
    record_shapes: bool = False  # torch.profiler: input shapes of each op (bigger traces)
    with_stack: bool = False  # torch.profiler: Python stacks of each op (much bigger traces, slower)
    with_flops: bool = False  # torch.profiler: FLOPs of matmuls and convolutions
    ranks: list[int] | None = None  # ranks that trace; null: every rank
    top: int = 5  # ops named in each trace's one-line summary (metrics.jsonl)

    def __post_init__(self):
        every_ok = self.light_every is None or (is_int(self.light_every) and self.light_every >= 1)
        check(every_ok, "light_every", f"must be >= 1 (or null: log.every), got {self.light_every}")
        check(self.wait >= 0, "wait", f"must be >= 0, got {self.wait}")
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(self.active >= 1, "active", f"must be >= 1, got {self.active}")
        check(self.every >= 0, "every", f"must be >= 0 (0: once), got {self.every}")
        check(self.top >= 1, "top", f"must be >= 1, got {self.top}")
        check(self.ranks is None or all(r >= 0 for r in self.ranks), "ranks", f"must be >= 0, got {self.ranks}")
        if self.trace is None:
            check(not self.memory, "memory", "needs profile.trace (the snapshot covers a trace window)")
            check(self.every == 0, "every", "repeats profile.trace, which is null")
            return
        start, stop = self.trace
        check(start >= 1, "trace", f"start must be a global step >= 1, got {list(self.trace)}")
        check(stop >= start, "trace", f"must be [start, stop] with stop >= start, got {list(self.trace)}")
        cycle = self.wait + self.warmup + self.active
        check(
            stop - start + 1 >= cycle,
            "trace",
            f"{list(self.trace)} spans {stop - start + 1} steps, fewer than wait + warmup + active = {cycle}",
        )
        check(
            self.every == 0 or self.every > stop - start,
            "every",
            f"must exceed the window's length ({stop - start + 1} steps) so windows do not overlap, got {self.every}",
        )

    @property
    def enabled(self) -> bool:
        return self.light or self.trace is not None

    def window_at(self, step: int) -> tuple[int, int] | None:
        """The trace window [start, stop] that global `step` falls in, or None."""
        if self.trace is None:
            return None
        start, stop = self.trace
        if step < start:
            return None
        shift = (step - start) // self.every * self.every if self.every else 0
        start, stop = start + shift, stop + shift
        return (start, stop) if step <= stop else None
