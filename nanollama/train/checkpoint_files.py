"""A checkpoint directory's names and its integrity: which steps are complete, and whether every file
still matches the size and CRC-32 its commit marker recorded (see checkpoint.py for the layout)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

MARKER = "COMPLETE"
EVAL_PENDING = "EVAL_PENDING"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_CHUNK = 4 << 20


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


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
    return step_dir(root, steps[-1]) if steps else None


def info(path: str | Path) -> dict:
    """The marker's content ({step, world_size, files}); raises FileNotFoundError for an incomplete checkpoint."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return json.loads(marker.read_text())


def crc32(path: str | Path) -> str:
    """The file's CRC-32 as 8 hex digits, read in chunks (catches every flipped byte and truncation)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def file_names(path: str | Path) -> list[str]:
    """The checkpoint's files (relative POSIX names, sorted) that the marker lists."""
    path = Path(path)
    names = (f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
    return sorted(n for n in names if n not in (MARKER, EVAL_PENDING))


def manifest(path: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    """{relative file name: {size, crc32}} for `names` (default: every file but the marker)."""
    path = Path(path)
    names = file_names(path) if names is None else names
    return {n: {"size": (path / n).stat().st_size, "crc32": crc32(path / n)} for n in names}


def verify(path: str | Path, part: tuple[int, int] = (0, 1)) -> str | None:
    """None if the checkpoint is intact, else one line naming the first bad file and what is wrong.

    `part=(i, n)` checks only every n-th listed file from the i-th, so n ranks share the reading.
    """
    path = Path(path)
    try:
        meta = info(path)
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / MARKER}: unreadable marker ({e})"
    files = meta.get("files")
    if files is None:  # written before checksums existed: presence only
        needed = ["dcp/.metadata", *(f"train_state_rank{r}.pt" for r in range(world))]
        for name in needed:
            if not (path / name).is_file():
                return f"{path / name}: missing"
        if not any((path / "dcp").glob("*.distcp")):
            return f"{path / 'dcp'}: no .distcp shard files"
        return None
    for name, want in list(files.items())[part[0] :: part[1]]:
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: {size} bytes instead of {want['size']} (truncated or overwritten)"
        if crc32(f) != want["crc32"]:
            return f"{f}: CRC-32 {crc32(f)} instead of {want['crc32']} (corrupted)"
    return None
