"""One trainer per run directory: an exclusive flock on run_dir/.lock, with the holder's host and pid inside.

The kernel drops a flock when its process ends, however it ends (kill -9 included), so a lock left
by a dead trainer is simply taken over; the host and pid written inside only name the holder in the
error a second launch gets, and the log notes a takeover. On NFS, Linux maps flock to the server's
byte-range locks, so trainers on different hosts exclude each other too. Where a filesystem has no
locking at all (flock fails with ENOLCK or EOPNOTSUPP), the file's host and pid decide: a live
process on this host holds it; a dead one, or another host's holder, is reported and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from nanollama.utils.checks import ConfigError

NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder(text: str) -> tuple[str, int] | None:
    try:
        host, pid = text.split()[:2]
        return host, int(pid)
    except ValueError:
        return None


_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description, which would keep
    # the flock alive after a kill -9 of the trainer until every worker noticed. Closing the child's
    # copy does not release the parent's lock (only LOCK_UN or the last close does).
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """Hold with `acquire()` (raises ConfigError naming the holder) and `release()`; idempotent release."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / NAME
        self._fd: int | None = None
        self.took_over: str | None = None  # "host H, pid P" of a stale holder, when one was replaced

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError("run_dir", f"cannot create {self.path.parent}: {e.strerror}") from None
        try:
            previous = _holder(os.pread(fd, 256, 0).decode(errors="replace"))
            here = socket.gethostname()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(previous) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # No locking on this filesystem: the written holder decides.
                if previous is not None and previous[0] == here and previous[1] != os.getpid() and _alive(previous[1]):
                    raise self._busy(previous) from None
            if previous is not None and previous != (here, os.getpid()):
                self.took_over = f"host {previous[0]}, pid {previous[1]}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{here} {os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(fd)

    def _busy(self, holder: tuple[str, int] | None) -> ConfigError:
        who = f"host {holder[0]}, pid {holder[1]}" if holder else "a process that has not written its name yet"
        return ConfigError(
            "run_dir", f"{self.path.parent} is in use by another trainer ({who}); {self.path} is its lock"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)  # a released lock names nobody
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
