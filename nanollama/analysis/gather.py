"""Runs of launcher sweeps as scaling-law points: (N, D, loss, bayes) per finished run, and the runs left out.

A run is a point when its task exited 0 (launcher's stdout/{id}.out, nanollama.launcher.status) and its
metrics.jsonl holds a finite evaluation at the last step; otherwise it is listed with the reason:
unfinished (pending, running, preempted, interrupted, failed), diverged (exit 3, or a nonfinite loss),
missing an evaluation. A run reached twice (the same run directory, or the same config in two log
directories) counts once.

N is the non-embedding parameter count (the model built on the meta device from the run's config).
D is tokens: `seen` = steps x batch_size x seq_len x accum_steps x world size (world size from the
metrics: tokens_per_s / tokens_per_s_per_device); `unique` = data.train_sequences x seq_len, the
distinct training tokens of a data budget; `auto` (the default) takes unique for a run with a budget
and seen for the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanollama import config, models
from nanollama.launcher.layout import SUBMITTED
from nanollama.launcher.status import task_state
from nanollama.observe.metrics import read_records
from nanollama.train.config import TrainConfig
from nanollama.utils.exit_codes import NONFINITE


@dataclass
class Run:
    log_dir: str
    task: int
    run_dir: str
    grid: dict
    n: int = 0  # non-embedding parameters
    params: int = 0  # with embeddings
    tokens_seen: int = 0
    unique_tokens: int | None = None
    d: int = 0
    loss: float = math.nan  # the last evaluation's eval_loss
    bayes: float | None = None
    epochs: float | None = None
    cluster: str = ""  # the config without seed and run_dir: seeds of one configuration resample together
    key: str = ""  # the config without run_dir: the same run launched twice


@dataclass
class Gathered:
    runs: list[Run] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (run_dir, why)

    def points(self):
        return [(r.n, r.d, r.loss) for r in self.runs]


def _identity(cfg: dict, drop: tuple[str, ...]) -> str:
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    return json.dumps(cfg, sort_keys=True, default=str)


def _nonembedding(cfg: TrainConfig) -> tuple[int, int]:
    spec = models.get(cfg.model.arch)
    with torch.device("meta"):  # no memory, no init: the shapes are all a count needs
        model = models.build(cfg.model)
    return spec.num_params(model, False), spec.num_params(model, True)


def _run(log_dir: Path, task: dict, tokens: str) -> Run | str:
    """The run's point, or why it is left out."""
    run_dir = Path(task["run_dir"])
    if not run_dir.is_absolute() and not run_dir.exists():
        run_dir = log_dir / run_dir
    state = task_state(log_dir / "stdout" / f"{task['id']}.out", (log_dir / SUBMITTED).exists())
    if state == f"failed ({NONFINITE})":
        return "diverged (exit 3)"
    records = read_records(run_dir / "metrics.jsonl")
    if any(isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]) for r in records):
        return "diverged (nonfinite loss)"
    if state != "done":
        return f"unfinished ({state})"
    if not (run_dir / "config.yaml").exists():
        return "no config.yaml"
    cfg = config.load(TrainConfig, run_dir / "config.yaml")
    evals = [r for r in records if "eval_loss" in r]
    if not evals or evals[-1]["step"] != cfg.steps:
        return f"missing an evaluation at step {cfg.steps}"
    last = evals[-1]
    if not math.isfinite(last["eval_loss"]):
        return "diverged (nonfinite eval_loss)"
    train = [r for r in records if "loss" in r]
    world = 1
    if train and train[-1].get("tokens_per_s_per_device"):
        world = round(train[-1]["tokens_per_s"] / train[-1]["tokens_per_s_per_device"])
    d = cfg.data
    n, params = _nonembedding(cfg)
    seen = cfg.steps * d.batch_size * d.seq_len * cfg.optim.accum_steps * world
    budget = getattr(d, "train_sequences", None)
    unique = budget * d.seq_len if budget else None
    if tokens == "unique" and unique is None:
        return "no data.train_sequences (--tokens unique)"
    raw = config.to_dict(cfg)
    return Run(
        log_dir=str(log_dir),
        task=task["id"],
        run_dir=str(run_dir),
        grid=task.get("grid", {}),
        n=n,
        params=params,
        tokens_seen=seen,
        unique_tokens=unique,
        d=unique if (tokens == "unique" or (tokens == "auto" and unique)) else seen,
        loss=float(last["eval_loss"]),
        bayes=last.get("bayes_loss"),
        epochs=train[-1].get("epoch") if train else None,
        cluster=_identity(raw, ("seed", "run_dir")),
        key=_identity(raw, ("run_dir",)),
    )


def gather(log_dirs: list[str | Path], tokens: str = "auto") -> Gathered:
    """Every task of these launcher log directories, as points or as runs left out (with the reason)."""
    if tokens not in ("auto", "seen", "unique"):
        raise ValueError(f"tokens must be auto, seen or unique, got {tokens!r}")
    out, seen_dirs, seen_configs = Gathered(), set(), {}
    for log_dir in map(Path, log_dirs):
        index = log_dir / "tasks.jsonl"
        if not index.exists():
            raise FileNotFoundError(f"{log_dir} is not a launcher log directory (no tasks.jsonl)")
        for line in index.read_text().splitlines():
            if not line.strip():
                continue
            task = json.loads(line)
            key = str(Path(task["run_dir"]).resolve())
            if key in seen_dirs:
                out.left_out.append((task["run_dir"], "duplicate (the same run directory listed again)"))
                continue
            seen_dirs.add(key)
            got = _run(log_dir, task, tokens)
            if isinstance(got, str):
                out.left_out.append((task["run_dir"], got))
                continue
            if got.key in seen_configs:
                out.left_out.append((got.run_dir, f"duplicate (the same config as {seen_configs[got.key]})"))
                continue
            seen_configs[got.key] = got.run_dir
            out.runs.append(got)
    return out
