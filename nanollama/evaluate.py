"""Held-out evaluation against the Bayes-optimal loss, in training and from saved checkpoints.

`python -m nanollama.evaluate RUN_DIR` evaluates the checkpoints marked pending evaluation
(checkpoint.eval_every), appends one record per checkpoint to RUN_DIR/evaluations.jsonl and clears
their mark, so that keep-last-k may delete them afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanollama import checkpoint, config
from nanollama.data import seeds
from nanollama.data.gssm import GSSM
from nanollama.model import Transformer
from nanollama.monitor import MetricsFile
from nanollama.run_config import TrainConfig


class HeldOut:
    """The eval batches (fixed by the graph seed, shared by every run on one graph) and their optimum."""

    def __init__(self, cfg: TrainConfig, gssm: GSSM):
        d = cfg.data
        batch_seeds = [seeds.derive_seed(d.graph_seed, seeds.EVAL, i) for i in range(cfg.eval.batches)]
        self.batches = [(s, gssm.sample(d.batch_size, d.seq_len + 1, seed=s)) for s in batch_seeds]
        # Targets are positions 2..T+1; a context graph's oracle needs each batch's sampling seed.
        self.bayes_loss = float(np.mean([gssm.nll(tokens, seed=s)[:, 1:].mean().item() for s, tokens in self.batches]))

    @torch.no_grad()
    def evaluate(self, loss_on) -> dict:
        """eval_loss, bayes_loss and excess_loss, with `loss_on(tokens) -> mean loss` (the model's)."""
        eval_loss = float(np.mean([loss_on(tokens).item() for _, tokens in self.batches]))
        return {"eval_loss": eval_loss, "bayes_loss": self.bayes_loss, "excess_loss": eval_loss - self.bayes_loss}


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens (B, T + 1): inputs [:, :-1], targets [:, 1:]."""
    logits = model(tokens[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def evaluate_pending(run_dir: Path) -> list[dict]:
    cfg = config.load(TrainConfig, run_dir / "config.yaml")
    held_out = HeldOut(cfg, GSSM(cfg.data.gssm, seed=cfg.data.graph_seed))
    model = Transformer(cfg.model).eval()
    results = MetricsFile(run_dir / "evaluations.jsonl")
    records = []
    for path in checkpoint.pending_evaluation(run_dir / "checkpoints"):
        checkpoint.load_model(path, model)
        record = {"step": checkpoint.info(path)["step"], **held_out.evaluate(lambda t: lm_loss(model, t))}
        results.write(record)
        checkpoint.mark_evaluated(path)
        records.append(record)
        print(
            f"step {record['step']} | eval_loss {record['eval_loss']:.4f} | bayes_loss {record['bayes_loss']:.4f} | "
            f"excess_loss {record['excess_loss']:.4f}"
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanollama.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    try:
        records = evaluate_pending(args.run_dir)
    except config.ConfigError as e:
        print(f"error: {args.run_dir / 'config.yaml'}: {e}", file=sys.stderr)
        return 2
    if not records:
        print("no checkpoint is pending evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
