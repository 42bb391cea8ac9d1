"""metrics.jsonl: append-only JSON lines, one per log step or evaluation (torch-free: the launcher reads it too)."""

from __future__ import annotations

import json
from pathlib import Path

from nanollama.utils.fileio import write_atomic


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short (still being written, or by a crash) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a crash counts as past every step (and is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsFile:
    """Append-only JSON lines, flushed per record so that a crash loses at most the line in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sinks: list = []  # trackers (nanollama.observe.trackers): each gets a copy of every record written

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (logged after the checkpoint a resumed run restarts from)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record["step"], record)

    def read(self) -> list[dict]:
        return read_records(self.path)
