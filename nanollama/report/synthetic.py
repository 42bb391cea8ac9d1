"""Synthetic run and sweep directories in the layouts training and the launcher write, for the report's
tests, its benchmark and the notebook's demo: no training needed, any length.

Losses follow L = bayes + 3 N^-0.3 + 20 tokens^-0.4 (N from model.dim) with 1% noise, so the curves
look like training and a sweep has a scaling law to fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from nanollama import config
from nanollama.observe.profile_file import ProfileFile
from nanollama.train.config import TrainConfig

BAYES = 1.29


def _config(run_dir: Path, dim: int, seed: int, steps: int, log_every: int) -> TrainConfig:
    cfg = TrainConfig()
    model = dataclasses.replace(cfg.model, dim=dim, n_layers=1, hidden_dim=2 * dim)
    data = dataclasses.replace(cfg.data, batch_size=4, seq_len=32)
    log = dataclasses.replace(cfg.log, every=log_every)
    return dataclasses.replace(cfg, run_dir=str(run_dir), seed=seed, steps=steps, model=model, data=data, log=log)


def write_run(
    run_dir: str | Path,
    *,
    dim: int = 32,
    seed: int = 0,
    steps: int = 1000,
    log_every: int = 10,
    eval_every: int = 100,
    upto: int | None = None,
    text: bool = False,
    probes: bool = False,
    profile: bool = False,
) -> Path:
    """A run directory (config.yaml, metrics.jsonl; probes.jsonl, profile.jsonl if asked) logged up to `upto`.

    text: no Bayes fields, as on text data. upto < steps: a run still in progress (its last line torn).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = _config(run_dir, dim, seed, steps, log_every)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    rng = np.random.default_rng(seed * 1000 + dim)
    n = 12 * dim * dim
    upto = steps if upto is None else upto
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    def loss(step):
        return BAYES + 3 * n**-0.3 + 20 * (step * tokens_per_step) ** -0.4

    lines = []
    for step in range(log_every, upto + 1, log_every):
        lr = 1e-3 * min(1.0, step / 100)
        mem = 4e8 + 1e3 * dim * dim
        lines.append(
            {
                "step": step,
                "loss": loss(step) * (1 + 0.01 * rng.normal()),
                "lr": lr,
                "grad_norm": abs(rng.normal(0.5, 0.1)),
                "tokens_per_s": 4e4 * (1 + 0.05 * rng.normal()),
                "tokens_per_s_per_device": 4e4,
                "mfu": 0.3,
                "hfu": 0.4,
                "host": "node0",
                "rss_bytes": mem,
                "cuda_max_allocated": 2 * mem,
                "cuda_max_reserved": 3 * mem,
            }
        )
        if step % eval_every == 0:
            e = {"step": step, "eval_loss": loss(step) * (1 + 0.002 * rng.normal()), "host": "node0"}
            if not text:
                e.update(bayes_loss=BAYES, excess_loss=e["eval_loss"] - BAYES)
            lines.append(e)
    body = "".join(json.dumps(r) + "\n" for r in lines)
    if upto < steps:
        body += '{"step": ' + str(upto + log_every) + ', "loss": 1.'  # the line being written when we looked
    (run_dir / "metrics.jsonl").write_text(body)
    if probes:
        recs = []
        for step in range(eval_every, upto + 1, eval_every):
            for i, layer in enumerate(("embed", "layer.0.resid", "final_norm")):
                frac = min(1.0, (0.5 + 0.2 * i) * (1 - np.exp(-step / 300)) + 0.3)
                recs.append({"step": step, "layer": layer, "node": "hidden", "acc": 0.9 * frac, "ceiling_acc": 0.9,
                             "acc_frac": frac, "chance_acc": 0.1})  # fmt: skip
        (run_dir / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if profile:  # through the light profiler's own file writer: its schema line, its fields
        out = ProfileFile(run_dir)
        out.open(0)
        for step in range(1, upto + 1):
            split = {"data_s": 0.001, "fwd_bwd_s": 0.02 + 0.001 * rng.random(), "optim_s": 0.004,
                     "monitor_s": 0.05 if step % eval_every == 0 else 0.0}  # fmt: skip
            rates = {"tokens": tokens_per_step, "tokens_per_s": 4e4, "tflops": 0.03, "mfu": 0.3, "hfu": 0.4}
            mem = {"mem_peak_bytes": 8e8, "mem_reserved_bytes": 1e9, "mem_kind": "rss", "traced": False}
            out.write({"step": step, "time": 1.7e9 + step, "step_s": sum(split.values()), **split, **rates, **mem})
    return run_dir


def write_sweep(
    log_dir: str | Path,
    dims=(16, 32, 64),
    seeds=(0, 1),
    *,
    steps: int = 1000,
    log_every: int = 10,
    eval_every: int = 100,
    running: int = 0,
) -> Path:
    """A launcher log directory (tasks.jsonl, tasks/, stdout/, runs/): one task per (dim, seed), all exited 0
    except the last `running` tasks, which are halfway."""
    log_dir = Path(log_dir)
    for sub in ("tasks", "stdout", "runs"):
        (log_dir / sub).mkdir(parents=True, exist_ok=True)
    (log_dir / "SUBMITTED").write_text("synthetic\n")
    points = [(d, s) for d in dims for s in seeds]
    index = []
    for task, (dim, seed) in enumerate(points):
        run_dir = log_dir / "runs" / str(task)
        done = task < len(points) - running
        write_run(run_dir, dim=dim, seed=seed, steps=steps, log_every=log_every, eval_every=eval_every,
                  upto=None if done else steps // 2)  # fmt: skip
        (log_dir / "tasks" / f"{task}.yaml").write_text((run_dir / "config.yaml").read_text())
        out = [f"[launcher] task {task}: attempt at node0"] + ([f"[launcher] task {task}: exit code 0"] if done else [])
        (log_dir / "stdout" / f"{task}.out").write_text("\n".join(out) + "\n")
        index.append(json.dumps({"id": task, "grid": {"model.dim": dim, "seed": seed}, "run_dir": str(run_dir)}))
    (log_dir / "tasks.jsonl").write_text("\n".join(index) + "\n")
    return log_dir
