"""Held-out evaluation against the Bayes-optimal loss, in training and from saved checkpoints.

`python -m nanollama.evaluate RUN_DIR` evaluates the checkpoints marked pending evaluation
(checkpoint.eval_every), appends one record per checkpoint to RUN_DIR/evaluations.jsonl and clears
their mark, so that keep-last-k may delete them afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanollama import checkpoint, config
from nanollama.data import seeds
from nanollama.data.gssm import GSSM
from nanollama.data.layout import IGNORE, Batch, lay_out_for, rows_needed
from nanollama.model import Transformer
from nanollama.monitor import MetricsFile
from nanollama.run_config import TrainConfig


class HeldOut:
    """The eval batches (fixed by the graph seed, shared by every run on one graph) and their optimum.

    Laid out for the run's mask like the training batches; the Bayes-optimal loss averages the
    exact NLL over the same scored targets as the model's loss.
    """

    def __init__(self, cfg: TrainConfig, gssm: GSSM):
        d = cfg.data
        rows = d.batch_size * rows_needed(d.mask, d.seq_len, d.doc_min)
        self.batches = []
        for i in range(cfg.eval.batches):
            s = seeds.derive_seed(d.graph_seed, seeds.EVAL, i)
            source = gssm.sample(rows, d.seq_len + 1, seed=s)
            # a context graph's oracle needs each batch's sampling seed (its per-sequence kernels)
            self.batches.append(lay_out_for(d, source, s, nll=gssm.nll(source, seed=s)))
        scored = sum((b.targets != IGNORE).sum().item() for b in self.batches)
        self.bayes_loss = sum(b.bayes.sum().item() for b in self.batches) / scored

    @torch.no_grad()
    def evaluate(self, loss_on) -> dict:
        """eval_loss, bayes_loss and excess_loss, with `loss_on(batch) -> mean loss` (the model's)."""
        counts = [(b.targets != IGNORE).sum().item() for b in self.batches]
        total = sum(loss_on(b).item() * n for b, n in zip(self.batches, counts))
        eval_loss = total / sum(counts)
        return {"eval_loss": eval_loss, "bayes_loss": self.bayes_loss, "excess_loss": eval_loss - self.bayes_loss}


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's scored targets."""
    logits = model(batch.inputs, mask=batch.mask, positions=batch.positions)  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1), ignore_index=IGNORE)


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
    # Evaluated checkpoints beyond checkpoint.keep are no longer protected: apply keep-last-k now,
    # as the trainer would at its next save (which may never come once training has finished).
    if records:
        checkpoint.prune(run_dir / "checkpoints", cfg.checkpoint.keep)
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
