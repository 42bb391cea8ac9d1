"""Experiment 1 of the original: test excess loss against a node's Dirichlet alpha, for two arms of sweeps.

Each arm is a launcher log directory whose grid varies one `data.gssm.nodes.<i>.alpha` (the other
node fixed). Per (alpha, model.dim): the mean and spread over seeds of the excess loss (eval_loss -
bayes_loss, from the finished runs that nanollama.analysis.gather keeps), and a gzip reference: the
run's held-out eval sequences, concatenated as bytes and gzip-compressed (level 9), in nats per token,
minus the Bayes-optimal loss of the same tokens (all positions).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from nanollama import config, data
from nanollama.analysis.gather import gather
from nanollama.analysis.plots import COLOURS, figure
from nanollama.train.config import TrainConfig


def gzip_excess(cfg: TrainConfig) -> tuple[float, float]:
    """(gzip nats per token, its excess over the Bayes-optimal loss) on the run's held-out eval batches."""
    source = data.build(cfg.data)
    tokens, nll = [], []
    for i in range(cfg.eval.batches):
        t, n, _ = source.held_out(cfg.data.batch_size, i)
        tokens.append(t)
        nll.append(n)
    flat = torch.cat(tokens).reshape(-1)
    if int(flat.max()) > 255:
        raise ValueError("gzip reference: tokens above 255 do not fit a byte")
    nats = len(gzip.compress(flat.to(torch.uint8).numpy().tobytes(), 9)) * 8 * math.log(2) / flat.numel()
    bayes = float(torch.cat(nll).double().mean())
    return nats, nats - bayes


def _alpha_key(grid: dict) -> str:
    keys = [k for k in grid if k.startswith("data.gssm.nodes.") and k.endswith(".alpha")]
    if len(keys) != 1:
        raise ValueError(f"a run's grid must vary exactly one data.gssm.nodes.<i>.alpha, got {sorted(grid)}")
    return keys[0]


def arm(log_dir: str | Path) -> dict:
    """{"key", "rows": [{alpha, dim, excess_mean, excess_std, seeds, gzip_nats, gzip_excess}], "left_out"}."""
    got = gather([log_dir], "seen")
    groups: dict[tuple[float, int], list] = {}
    key = None
    for run in got.runs:
        key = _alpha_key(run.grid)
        cfg = config.load(TrainConfig, Path(run.run_dir) / "config.yaml")
        groups.setdefault((float(run.grid[key]), cfg.model.dim), []).append((run, cfg))
    rows, gz = [], {}
    for (alpha, dim), runs in sorted(groups.items()):
        excess = np.array([r.loss - r.bayes for r, _ in runs if r.bayes is not None])
        if alpha not in gz:
            gz[alpha] = gzip_excess(runs[0][1])
        rows.append(
            {
                "alpha": alpha,
                "dim": dim,
                "excess_mean": float(excess.mean()),
                "excess_std": float(excess.std()) if len(excess) > 1 else 0.0,
                "seeds": len(excess),
                "gzip_nats": gz[alpha][0],
                "gzip_excess": gz[alpha][1],
            }
        )
    return {"log_dir": str(log_dir), "key": key, "rows": rows, "left_out": got.left_out}


def figure_of(arms: dict[str, dict]) -> str:
    """Excess loss against alpha, one line per arm and width, the gzip reference dashed-free in grey tones."""
    series = []
    for i, (name, a) in enumerate(arms.items()):
        for j, dim in enumerate(sorted({r["dim"] for r in a["rows"]})):
            rows = [r for r in a["rows"] if r["dim"] == dim]
            colour = COLOURS[(2 * i + j) % len(COLOURS)]
            x, y = [r["alpha"] for r in rows], [r["excess_mean"] for r in rows]
            series.append({"x": x, "y": y, "kind": "line", "colour": colour})
            series.append({"x": x, "y": y, "kind": "points", "label": f"{name} dim {dim}", "colour": colour})
        rows = sorted({r["alpha"]: r for r in a["rows"]}.values(), key=lambda r: r["alpha"])
        grey = ["#555555", "#aaaaaa"][i % 2]
        series.append({"x": [r["alpha"] for r in rows], "y": [r["gzip_excess"] for r in rows], "kind": "line",
                       "label": f"{name} gzip", "colour": grey})  # fmt: skip
    return figure("test excess loss against alpha", "alpha", "excess loss (nats/token)", series)
