"""The time a run has left: an ETA for every log line, and a live progress line on a terminal.

The live line (step, tokens/s, ETA, redrawn with a carriage return after every step) is only for a
person watching: it is written when stdout is a terminal, never into files or pipes, and cleared
before each log line so that the log reads as if it were not there.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_eta(seconds: float | None) -> str:
    """'1h02m', '3m05s', '42s'; '?' while unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Steps done this launch and their pace; `eta()` for the log, `update()` for the live line."""

    def __init__(self, start_step: int, total_steps: int, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live = _isatty(self.stream) if live is None else live
        self.start_step, self.total = start_step, total_steps
        self.begin = time.perf_counter()
        self.step = start_step
        self._shown = 0  # characters of the live line on screen

    def eta(self, step: int | None = None) -> float | None:
        """Seconds left at the mean pace of this launch's steps so far (None before the first step)."""
        step = self.step if step is None else step
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.begin) / done * (self.total - step)

    def update(self, step: int, tokens_per_s: float | None) -> None:
        """Record that `step` is done; on a terminal, redraw the live line."""
        self.step = step
        if not self.live:
            return
        rate = f" | tok/s {tokens_per_s:,.0f}" if tokens_per_s else ""
        line = f"step {step:>6}/{self.total}{rate} | eta {format_eta(self.eta())}"
        self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.stream.flush()
        self._shown = len(line)

    def clear(self) -> None:
        """Erase the live line (before a log line is printed)."""
        if self.live and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
