"""Signals turned into a clean stop, from the start of the process to its end.

The handler is installed before anything slow (the entry point installs it before importing torch),
so a SIGTERM or SIGUSR1 during start-up (imports, building, loading a checkpoint) is a clean exit 75
and SIGINT 130, never the default deaths 143 / 138 / a traceback, which a scheduler would not requeue.
The trainer checks the flag between start-up phases (exiting without a checkpoint: nothing new to
save) and after each step (checkpointing first).
"""

from __future__ import annotations

import signal
import time

from nanollama.utils import exit_codes


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGUSR1 into a flag the loop checks after each step."""

    CODES = {
        signal.SIGINT: exit_codes.INTERRUPTED,
        signal.SIGTERM: exit_codes.PREEMPTED,
        signal.SIGUSR1: exit_codes.PREEMPTED,
    }

    def __init__(self):
        self.signum: int | None = None
        self._since = 0.0
        self._previous = {}
        self._depth = 0

    def __enter__(self):
        if self._depth == 0:
            for signum in self.CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        # A second Ctrl-C stops at once, without a checkpoint; one within a second is the same
        # keypress delivered twice (by the terminal and by torchrun).
        if self.signum == signal.SIGINT and signum == signal.SIGINT and time.monotonic() - self._since > 1.0:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self._since = signum, time.monotonic()

    @property
    def exit_code(self) -> int:
        # A rank stopped because another one was signalled counts as preempted.
        return self.CODES.get(self.signum, exit_codes.PREEMPTED)


_early: StopRequest | None = None


def install_early() -> StopRequest:
    """Install the process's StopRequest now (the entry point, before its imports); `current` returns it."""
    global _early
    if _early is None:
        _early = StopRequest().__enter__()
    return _early


def ignore_late_stops() -> None:
    """At the very end of a run: a TERM / USR1 still arriving (a launcher repeats its request until the
    process is gone) must not kill the exit. Python's finalisation resets signals that have Python
    handlers to their default actions (death by 143 / 138) but leaves ignored ones ignored."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def current() -> StopRequest:
    """The StopRequest installed at process start, or a fresh one (to enter) for in-process callers."""
    return _early if _early is not None else StopRequest()
