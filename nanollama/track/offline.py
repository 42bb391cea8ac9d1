"""Reading offline wandb runs back: the history rows of a run id, with its rewinds and forks applied.

An offline run directory (WANDB_DIR/wandb/offline-run-*-ID/run-ID.wandb) holds one segment of a run:
each resume writes another. The records are read with `wandb leet inspect --json` (wandb's documented
reader of its .wandb transaction logs). A segment whose run record has a branch point starts from
the history of that run up to the point (a rewind when it is the same run, a fork otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def records(wandb_file: str | Path) -> list[dict]:
    """The records of one .wandb file, as wandb's reader prints them."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def segments(wandb_dir: str | Path, run_id: str = "*") -> list[dict]:
    """The offline segments of `run_id` (every run: "*") under wandb_dir or wandb_dir/wandb, oldest first:
    run id, start time, branch point and history rows (step -> row)."""
    root, pattern = Path(wandb_dir), f"offline-run-*/run-{run_id}.wandb"  # a dir per start, "-1" on a clash
    found = []
    for path in sorted(root.glob(pattern)) + sorted(root.glob(f"wandb/{pattern}")):
        segment = {"file": path, "id": None, "start": "", "branch": None, "rows": {}}
        for rec in records(path):
            if rec.get("type") == "run":
                run = rec["run"]
                segment.update(id=run.get("run_id"), start=run.get("start_time", ""), branch=run.get("branch_point"))
            elif rec.get("type") == "history":
                item = rec["history"]["item"]
                step = int(item.get("_step", rec["history"].get("step", {}).get("num", 0)))
                segment["rows"].setdefault(step, {}).update(item)
        found.append(segment)
    return sorted(found, key=lambda s: s["start"])


def history(wandb_dir: str | Path, run_id: str) -> dict[int, dict]:
    """step -> the row the run holds at that step, once each, after its rewinds (and the fork it came from)."""
    rows: dict[int, dict] = {}
    for seg in segments(wandb_dir, run_id):
        branch = seg["branch"]
        if branch:
            point, parent = int(branch.get("value", 0)), branch.get("run")
            base = rows if parent == run_id else history(wandb_dir, parent)
            rows = {step: row for step, row in base.items() if step <= point}
        for step, row in seg["rows"].items():
            rows.setdefault(step, {}).update(row)
    return dict(sorted(rows.items()))
