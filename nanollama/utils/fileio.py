"""Writes that never leave a half-written file behind: a temporary name beside the target, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file or a directory (its entries, e.g. after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    """Write `data` to `path` through a unique temporary file in the same directory and a rename.

    Readers see the old file or the new one, never a part of either; concurrent writers each use
    their own temporary name. `durable` also fsyncs the file and the directory (survives a power cut).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
