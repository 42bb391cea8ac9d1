"""Signals turned into a clean stop: the loop checks a flag after each step and checkpoints first."""

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

    def __enter__(self):
        for signum in self.CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

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
