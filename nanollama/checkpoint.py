"""Atomic checkpoints in run_dir/checkpoints/step_XXXXXXXX/, keeping the last k.

A checkpoint is written into a temporary directory, each file flushed to disk, a COMPLETE marker
written last, and only then renamed into place. Loading considers only directories that carry the
marker, so a crash mid-write never leaves something that looks like the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save(root: str | Path, step: int, parts: dict[str, Any], keep: int | None = None) -> Path:
    """Write each part to `<name>.pt` of a new checkpoint for `step`; prune to the last `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, obj in parts.items():
        with open(tmp / f"{name}.pt", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    with open(tmp / MARKER, "w") as f:
        json.dump({"step": step, "parts": sorted(parts)}, f)
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(root, step)
    if final.exists():  # re-saving a step (e.g. after a resume at the end of training)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        prune(root, keep)
    return final


def complete_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under root, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(root: str | Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(Path(root), steps[-1]) if steps else None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """All parts of one complete checkpoint directory, by name."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    names = json.loads((path / MARKER).read_text())["parts"]
    return {n: torch.load(path / f"{n}.pt", map_location=map_location, weights_only=False) for n in names}


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the last `keep` complete checkpoints, and leftovers of interrupted writes."""
    root = Path(root)
    for step in complete_steps(root)[:-keep]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-step_") and not entry.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
