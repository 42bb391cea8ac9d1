"""What the report reads: run directories (metrics, probes, profiles) and launcher log directories (sweeps).

A path is a launcher log directory when it holds tasks.jsonl (its tasks come from
nanollama.launcher.status.rows, the scaling points from nanollama.analysis.gather), else a run
directory (metrics.jsonl). Everything is read with nanollama.observe.metrics.read_records, which
skips a line still being written, so a run in progress shows what it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from nanollama.launcher.status import rows
from nanollama.observe.metrics import read_records
from nanollama.observe.profile_file import read_profile

TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "hfu", "rss_bytes", "cuda_max_allocated",
              "cuda_max_reserved")  # fmt: skip
EVAL_KEYS = ("step", "eval_loss", "bayes_loss", "excess_loss")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where built: ~10x faster


class ReportError(ValueError):
    """A path the report cannot use (missing, or no metrics): one line, exit 2."""


def columns(records: list[dict], keys) -> dict[str, np.ndarray]:
    """key -> float array over the records, NaN where a record lacks the key or holds null/non-numbers."""

    def num(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan

    out = {}
    for k in keys:
        values = [r.get(k) for r in records]
        try:  # numpy turns None into NaN itself: 3x faster than checking each value (10k records x 100 runs)
            out[k] = np.array(values, float)
        except (TypeError, ValueError):  # a string or a list where a number belongs
            out[k] = np.array([num(v) for v in values], float)
    return out


@dataclass
class Run:
    name: str  # the legend label
    run_dir: Path
    grid: dict = field(default_factory=dict)
    state: str = ""
    train: dict[str, np.ndarray] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)  # per train record
    evals: dict[str, np.ndarray] = field(default_factory=dict)
    tokens_per_step: int | None = None  # None: the config is missing, curves are drawn against steps
    probes: list[dict] = field(default_factory=list)
    profiles: dict[str, list[dict]] = field(default_factory=dict)  # file stem (profile, profile.rank1) -> steps

    @property
    def has_bayes(self) -> bool:
        return bool(len(self.evals.get("bayes_loss", ()))) and bool(np.isfinite(self.evals["bayes_loss"]).any())


@dataclass
class Section:
    """The runs of one launcher log directory (a sweep), or the run directories given on their own."""

    label: str
    runs: list[Run]
    log_dir: Path | None = None
    table: list[dict] = field(default_factory=list)  # launcher.status.rows of a sweep


def _tokens_per_step(run_dir: Path, records: list[dict]) -> int | None:
    """batch_size x seq_len x accum_steps x world size (world from tokens_per_s / tokens_per_s_per_device)."""
    try:
        cfg = yaml.load((run_dir / "config.yaml").read_text(), Loader=_LOADER) or {}
        per_rank = cfg["data"]["batch_size"] * cfg["data"]["seq_len"] * cfg.get("optim", {}).get("accum_steps", 1)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    world = 1
    for r in reversed(records):
        if r.get("tokens_per_s") and r.get("tokens_per_s_per_device"):
            world = max(round(r["tokens_per_s"] / r["tokens_per_s_per_device"]), 1)
            break
    return int(per_rank * world)


def read_run(run_dir: Path, name: str, grid: dict | None = None, state: str = "") -> Run:
    records = read_records(run_dir / "metrics.jsonl")
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and "step" in r]
    evals = [r for r in records if "eval_loss" in r and "step" in r]
    profiles = {}
    for path in sorted(run_dir.glob("profile*.jsonl")):  # each rank's files, and one per schema on a resume
        steps = [r for r in read_profile(path)[1] if isinstance(r.get("step"), (int, float))]
        if steps:
            profiles[path.stem] = steps
    return Run(
        name=name,
        run_dir=run_dir,
        grid=grid or {},
        state=state,
        train=columns(train, TRAIN_KEYS),
        hosts=[str(r.get("host", "")) for r in train],
        evals=columns(evals, EVAL_KEYS),
        tokens_per_step=_tokens_per_step(run_dir, train),
        probes=read_records(run_dir / "probes.jsonl"),
        profiles=profiles,
    )


def _grid_label(grid: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in grid.items())


def read_sweep(log_dir: Path) -> Section:
    table = rows(log_dir)
    runs = []
    for row in table:
        run_dir = Path(row["run_dir"])
        if not run_dir.is_absolute() and not run_dir.exists():  # relative to the log directory, as gather reads it
            run_dir = log_dir / run_dir
            row["run_dir"] = str(run_dir)
        name = f"{row['id']}: {_grid_label(row['grid'])}" if row["grid"] else f"task {row['id']}"
        runs.append(read_run(run_dir, name, row["grid"], row["state"]))
    return Section(label=f"sweep {log_dir}", runs=runs, log_dir=log_dir, table=table)


def read(paths: list[str | Path]) -> list[Section]:
    """One section per launcher log directory and one for all the run directories; ReportError without metrics."""
    sections, loose = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path}: no such directory (give run directories or launcher log directories)")
        if (path / "tasks.jsonl").exists():
            try:
                section = read_sweep(path)
            except (FileNotFoundError, ValueError) as e:
                raise ReportError(f"{path}: cannot read the launch ({e})") from None
            if not any(len(r.train["step"]) or len(r.evals["step"]) for r in section.runs):
                raise ReportError(f"{path}: no metrics yet in any task's metrics.jsonl (nothing to report)")
            sections.append(section)
            continue
        run = read_run(path, path.name or str(path))
        if not len(run.train["step"]) and not len(run.evals["step"]):
            raise ReportError(f"{path}: no metrics (no records in {path / 'metrics.jsonl'}): nothing to report")
        loose.append(run)
    if loose:
        sections.append(Section(label="runs", runs=loose))
    return sections
