"""Trackers: every record that goes to metrics.jsonl also goes to wandb and/or TensorBoard (`log.trackers`).

metrics.jsonl stays the source of truth (always on); a tracker is a copy that may fail: one that cannot
start, or that raises while logging, warns once and is dropped, and training goes on. Only rank 0 logs.

wandb: the run id lives in RUN_DIR/track/wandb.json (a Ledger, shared with `python -m nanollama.track`),
so a relaunch continues the same run. The x-axis is wandb's own step, set to the training step, which
is monotonic within a run. A resume from checkpoint step k after the run logged up to m > k would log
k+1..m again, which wandb drops (with a warning) as steps below its last one; so that resume rewinds
the run to k (`resume_from="ID?_step=k"`, the same run id: the history past k is replaced by the
resumed values) or, with `log.wandb.resume=fork`, forks a new run from k (`fork_from`) and records the
new id. Both are recorded in the offline run files and applied by the server at `wandb sync`.

TensorBoard: event files under RUN_DIR/tb/ (ledger RUN_DIR/track/tensorboard.json); a resume before the
last step held opens the writer with purge_step=k+1, so TensorBoard hides the events past the checkpoint
that the resumed run writes again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml

from nanollama.utils.fileio import write_atomic

INSTALL = "pip install 'nanollama[track]' (or: pip install wandb tensorboard)"


class Tracker(Protocol):
    def log(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record under dotted keys (nested dicts and lists flattened); `step` and text left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key == "step":
            continue
        if isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, dict):
            out.update(scalars(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out.update(scalars(dict(enumerate(value)), f"{name}."))
    return out


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (wandb's config table filters on them)."""
    if not isinstance(config, dict):
        return {prefix[:-1]: config} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Ledger:
    """RUN_DIR/track/{name}.json: what a tracker holds of the run (the wandb id, the last step per source).

    Shared by the live trackers and `python -m nanollama.track`, so either one continues the other's
    run and neither sends a record twice. The uploader's per-step checksums live beside it in
    {name}.sums.json (large, so rewritten only by an upload or a rewind). Written atomically; a torn
    or missing file reads as empty.
    """

    def __init__(self, run_dir: str | Path, name: str):
        self.path = Path(run_dir) / "track" / f"{name}.json"
        self.sums_path = self.path.with_suffix(".sums.json")
        self.data: dict = _read_json(self.path)
        self.data.setdefault("steps", {})
        self.data.setdefault("artifacts", [])
        self.autosave = True  # save at every new step (live); the uploader saves once at the end
        self._sums: dict | None = None

    @property
    def steps(self) -> dict[str, int]:
        return self.data["steps"]

    @property
    def sums(self) -> dict[str, dict[str, int]]:
        """source -> step (a string) -> the checksum of the values sent at that step."""
        if self._sums is None:
            self._sums = _read_json(self.sums_path)
        return self._sums

    def last(self) -> int:
        """The highest step the tracker holds from any source (-1: none)."""
        return max(self.steps.values(), default=-1)

    def rewind(self, step: int) -> None:
        """The tracker dropped everything past `step` (a rewind, a fork, a purge)."""
        self.data["steps"] = {k: min(v, step) for k, v in self.steps.items()}
        for rows in self.sums.values():
            for key in [key for key in rows if int(key) > step]:
                del rows[key]

    def logged(self, source: str, step: int) -> None:
        if step > self.steps.get(source, -1):
            self.steps[source] = step
            if self.autosave:
                self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        if self._sums is not None:
            write_atomic(self.sums_path, json.dumps(self._sums, sort_keys=True) + "\n")
            self._sums = None  # written: the live path never rewrites it again


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sweep_name(run_dir: str | Path) -> str | None:
    """The launcher's sweep name when run_dir is a task's (LOG_DIR/runs/ID with LOG_DIR/launcher.yaml), else None."""
    run_dir = Path(run_dir).resolve()
    launcher = run_dir.parent.parent / "launcher.yaml"
    if run_dir.parent.name != "runs" or not launcher.is_file():
        return None
    try:
        name = (yaml.safe_load(launcher.read_text()) or {}).get("launcher", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name) if name else run_dir.parent.parent.name


def default_name(run_dir: str | Path) -> str:
    """A run's wandb name: the run directory's, prefixed by the sweep's for a task (task dirs are just ids)."""
    sweep = sweep_name(run_dir)
    return f"{sweep}-{Path(run_dir).name}" if sweep else Path(run_dir).name


def new_id() -> str:
    """A fresh wandb run id (8 lowercase hex digits: valid in every wandb id check)."""
    return secrets.token_hex(4)


class WandbTracker:
    """One wandb run, logged at the training step; records go to the ledger under `source`.

    `resume_step`: where the caller's records start again (the checkpoint a run resumed from). When
    the run already holds steps past it, it is rewound (or forked) there first.
    """

    def __init__(
        self,
        run_dir: str | Path,
        options: Any,  # a WandbConfig (project, entity, name, group, tags, mode, resume, timeouts)
        config: dict,
        resume_step: int = 0,
        source: str = "metrics",
        mode: str | None = None,
        wandb_dir: str | Path | None = None,
    ):
        import wandb  # optional: the caller turns an ImportError into one line saying what to install

        self.run_dir, self.source, self._wandb = Path(run_dir), source, wandb
        self.ledger = Ledger(run_dir, "wandb")
        run_id = self.ledger.data.get("id")
        kwargs: dict[str, Any] = {}
        if run_id is None:
            run_id, kwargs["resume"] = new_id(), "allow"
        elif resume_step >= self.ledger.last():
            kwargs["resume"] = "allow"  # nothing logged past the resume point: just continue
        elif options.resume == "fork":
            kwargs["fork_from"] = f"{run_id}?_step={resume_step}"
            run_id = new_id()
        else:
            kwargs["resume_from"] = f"{run_id}?_step={resume_step}"
        if wandb_dir is None and not os.environ.get("WANDB_DIR"):
            wandb_dir = self.run_dir  # offline run directories beside the run's own files
        if wandb_dir is not None:
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            init_timeout=options.init_timeout_s,
            finish_timeout=getattr(options, "finish_timeout_s", 0.0),  # the end of training never hangs on it
            console="off",  # the trainer's own log and live line stay as they are
            x_disable_stats=True,  # system metrics: the ones the trainer records (memory, GPUs)
            save_code=False,
            disable_git=True,
            x_save_requirements=False,  # a pip freeze per start: seconds on a busy machine; the run dir has the config
            silent=True,
        )
        self.run = wandb.init(
            id=run_id,
            project=options.project,
            entity=options.entity,
            name=options.name or default_name(self.run_dir),
            group=options.group or sweep_name(self.run_dir),
            tags=list(options.tags) or None,
            config=flatten(config),
            mode=mode or options.mode,
            dir=None if wandb_dir is None else str(wandb_dir),
            settings=settings,
            **kwargs,
        )
        if "resume" not in kwargs:
            self.ledger.rewind(resume_step)
        if "fork_from" in kwargs:
            self.ledger.data["artifacts"] = []  # the fork's artifacts are its own
        self.ledger.data.update(id=run_id, project=options.project, entity=options.entity)
        self.ledger.save()

    @property
    def id(self) -> str:
        return self.ledger.data["id"]

    def log(self, step: int, record: dict, source: str | None = None) -> None:
        values = scalars(record)
        if values:
            # Records of one step (a log step and its evaluation) join one row: wandb commits a row
            # once a later step arrives or the run finishes.
            self.run.log(values, step=step)
        self.ledger.logged(source or self.source, step)

    def log_artifact(self, path: Path, name: str, kind: str = "profile-trace") -> bool:
        """Upload one file as an artifact, once per run (False: it already was)."""
        key = str(path.relative_to(self.run_dir))
        if key in self.ledger.data["artifacts"]:
            return False
        artifact = self._wandb.Artifact(name, type=kind)
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)
        self.ledger.data["artifacts"].append(key)
        self.ledger.save()
        return True

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Event files under RUN_DIR/tb; a resume before the last step held purges the events past it."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, source: str = "metrics"):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.source, self.ledger = source, Ledger(run_dir, "tensorboard")
        log_dir = Path(run_dir) / "tb"
        held = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard hides every event at or past it that an earlier writer left (so does
        # any event file reader that honours the restart marker it writes, e.g. EventAccumulator)
        purge = resume_step + 1 if held else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)
        if purge is not None:
            self.ledger.rewind(resume_step)
            self.ledger.save()

    def log(self, step: int, record: dict, source: str | None = None) -> None:
        for tag, value in scalars(record).items():
            if isinstance(value, float) and not math.isfinite(value):
                continue  # TensorBoard's charts break on inf; the jsonl keeps it
            self.writer.add_scalar(tag, value, step)
        self.ledger.logged(source or self.source, step)

    def close(self) -> None:
        self.writer.close()


class Trackers:
    """The trackers of a run: a failing one warns once (through `warn`) and is dropped; training goes on."""

    def __init__(self, trackers: dict[str, Tracker], warn: Callable[[str], None]):
        self.trackers, self.warn = trackers, warn

    def log(self, step: int, record: dict) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, record)
            except Exception as e:  # a tracker is a copy of metrics.jsonl: never worth a training run
                self.warn(f"{name} tracker failed while logging step {step} ({type(e).__name__}: {e}); dropped it")
                del self.trackers[name]

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as e:
                self.warn(f"{name} tracker failed while closing ({type(e).__name__}: {e})")
        self.trackers = {}


def build(log_cfg: Any, run_dir: str | Path, config: dict, resume_step: int, warn: Callable[[str], None]) -> Trackers:
    """The trackers `log_cfg.trackers` names besides jsonl (the trainer's MetricsFile), started now.

    Call on rank 0 only. One that cannot start (not installed, a bad wandb mode or directory, no network
    within log.wandb.init_timeout_s) is left out with one warning.
    """
    run_dir = Path(run_dir)
    started: dict[str, Tracker] = {}
    for name in dict.fromkeys(log_cfg.trackers):  # in order, once each
        try:
            if name == "wandb" and log_cfg.wandb.mode != "disabled":
                started[name] = WandbTracker(run_dir, log_cfg.wandb, config, resume_step)
            elif name == "tensorboard":
                started[name] = TensorBoardTracker(run_dir, resume_step)
        except ImportError as e:
            warn(f"log.trackers: {name} is not installed ({e}); training goes on without it: {INSTALL}")
        except Exception as e:
            warn(f"log.trackers: {name} could not start ({type(e).__name__}: {e}); training goes on without it")
    return Trackers(started, warn)
