"""Replaying run directories into wandb runs or TensorBoard event files, sending only what is new.

The ledger (RUN_DIR/track/{wandb,tensorboard}.json, shared with the live trackers) holds the last step
sent per source and a checksum per sent step. A record past its source's last step is new. Where one
lies at or before a step already sent (a probe or evaluation written after training went on, or a
metrics file rewritten by a resume from an earlier checkpoint: a changed checksum), the run is
rewound (wandb) or purged (TensorBoard) to just before it and everything after is sent again, so each
step is held once, with the file's current values. Nothing new: nothing is sent, not even a run opened.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nanollama.observe.trackers import Ledger, TensorBoardTracker, WandbTracker, default_name, sweep_name
from nanollama.track import replay


class TrackError(ValueError):
    """A directory that cannot be uploaded: reported in one line, exit 2."""


@dataclass
class Target:
    run_dir: Path
    group: str | None = None
    name: str | None = None
    config: dict = field(default_factory=dict)


def _config(run_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def targets(paths: list[Path]) -> list[Target]:
    """Run directories to upload: each path is one, or a launcher log directory (one per task, grouped)."""
    out = []
    for path in paths:
        if (path / "tasks.jsonl").is_file():
            group = sweep_name(path / "runs" / "0") or path.name
            for line in (path / "tasks.jsonl").read_text().splitlines():
                task = json.loads(line)
                run_dir = Path(task["run_dir"])
                if not run_dir.is_dir():  # a log directory moved since the launch
                    run_dir = path / "runs" / str(task["id"])
                cfg = {**_config(run_dir), "task": task["id"], "grid": task.get("grid", {})}
                out.append(Target(run_dir, group, f"{group}-{task['id']}", cfg))
        elif (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
            out.append(Target(path, sweep_name(path), default_name(path), _config(path)))
        else:
            raise TrackError(f"{path}: neither a run directory (no metrics.jsonl) nor a launcher log directory")
    return out


def _digest(values: dict) -> int:
    return zlib.crc32(json.dumps(values, sort_keys=True).encode())


def plan(run_dir: Path, ledger: Ledger) -> tuple[int, list[tuple[int, str, dict]]]:
    """(step the tracker must hold nothing past, [(step, source, values)] to send in order)."""
    data = replay.read(run_dir)
    digests = ledger.sums
    first = None  # the first step to send
    for source, rows in data.items():
        sent, sums = ledger.steps.get(source, -1), digests.get(source, {})
        for step, values in rows.items():
            # a source sent by the uploader has a checksum per step; one sent live (no checksums) is trusted
            changed = step <= sent and bool(sums) and sums.get(str(step)) != _digest(values)
            if step > sent or changed:
                first = step if first is None else min(first, step)
                break
    if first is None:
        return ledger.last(), []
    start = first - 1 if first <= ledger.last() else ledger.last()  # rewind to just before it, or continue
    order = {s: i for i, s in enumerate(replay.SOURCES)}
    rows = [(step, src, values) for src, r in data.items() for step, values in r.items() if step > start]
    rows.sort(key=lambda row: (row[0], order[row[1]]))
    return start, rows


def _send(tracker, rows: list[tuple[int, str, dict]]) -> None:
    """Log the rows; the ledger is saved once at the end (a crash before: the next upload sends them again)."""
    tracker.ledger.autosave = False
    sums = tracker.ledger.sums
    for step, source, values in rows:
        tracker.log(step, values, source=source)
        sums.setdefault(source, {})[str(step)] = _digest(values)
    tracker.ledger.save()


def upload_wandb(target: Target, options, mode: str, wandb_dir: Path | None = None) -> str:
    """Send a run's new records (and new traces) to its wandb run; returns a one-line account.

    options: a WandbConfig, or a function making one (it imports the training config, i.e. torch).
    """
    ledger = Ledger(target.run_dir, "wandb")
    start, rows = plan(target.run_dir, ledger)
    traces = [
        p for p in replay.traces(target.run_dir) if str(p.relative_to(target.run_dir)) not in ledger.data["artifacts"]
    ]
    if not rows and not traces:
        return f"{target.run_dir}: up to date (wandb run {ledger.data.get('id')}, step {ledger.last()})"
    options = options() if callable(options) else options  # built only when there is something to send
    opts = _with(options, group=options.group or target.group, name=options.name or target.name)
    tracker = WandbTracker(target.run_dir, opts, target.config, start, mode=mode, wandb_dir=wandb_dir)
    try:
        _send(tracker, rows)
        sent = sum(tracker.log_artifact(p, _artifact_name(target, p)) for p in traces)
    finally:
        tracker.close()
    how = f"from step {rows[0][0]}" if rows else "no new steps"
    return f"{target.run_dir}: wandb run {tracker.id}: {len({r[0] for r in rows})} steps {how}, {sent} traces"


def upload_tensorboard(target: Target) -> str:
    """Write a run's new records to RUN_DIR/tb event files; returns a one-line account."""
    ledger = Ledger(target.run_dir, "tensorboard")
    start, rows = plan(target.run_dir, ledger)
    if not rows:
        return f"{target.run_dir}: up to date (tensorboard, step {ledger.last()})"
    tracker = TensorBoardTracker(target.run_dir, start)
    try:
        _send(tracker, rows)
    finally:
        tracker.close()
    return f"{target.run_dir}/tb: {len({r[0] for r in rows})} steps from step {rows[0][0]}"


def _artifact_name(target: Target, path: Path) -> str:
    """wandb artifact names allow [A-Za-z0-9_.-]: the run's name and the trace's place under profile/."""
    rel = path.relative_to(target.run_dir / "profile").as_posix().removesuffix(".json.gz")
    raw = f"{target.name or target.run_dir.name}-{rel}"
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in raw)


def _with(options, **changes):
    return dataclasses.replace(options, **{k: v for k, v in changes.items() if v is not None})


def wandb_options(target: Target, project: str | None = None, entity: str | None = None, group: str | None = None):
    """The run's own log.wandb settings (defaults where its config has none), with the command line's on top."""
    from nanollama import config
    from nanollama.train.config import WandbConfig

    saved = (target.config.get("log") or {}).get("wandb") or {}
    try:
        options = config.build(WandbConfig, saved, "log.wandb")
    except ValueError:  # a config from another version: the defaults serve
        options = WandbConfig()
    options = _with(options, project=project, entity=entity, group=group)
    return dataclasses.replace(options, finish_timeout_s=0.0)  # an upload waits for its data to go up
