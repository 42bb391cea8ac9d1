"""The held-out evaluation batches of a run and, where the source has an oracle, their Bayes-optimal loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nanollama.data.batch import IGNORE, Batch, rows_needed
from nanollama.data.source import DataSource


class HeldOut:
    """`n_batches` fixed eval batches (the same for every run on the source), laid out for the run's mask.

    The Bayes-optimal loss, when the source gives each token's exact NLL, averages it over the same
    scored targets as the model's loss, so the excess is exact.
    """

    def __init__(self, source: DataSource, n_batches: int):
        d = source.cfg
        rows = d.batch_size * rows_needed(d.mask, d.seq_len, d.doc_min)
        self.batches: list[Batch] = []
        for i in range(n_batches):
            tokens, nll, layout_seed = source.held_out(rows, i)
            self.batches.append(source.lay_out(tokens, layout_seed, nll=nll))
        self.counts = [int((b.targets != IGNORE).sum()) for b in self.batches]
        has_oracle = all(b.bayes is not None for b in self.batches)
        self.bayes_loss = sum(float(b.bayes.sum()) for b in self.batches) / sum(self.counts) if has_oracle else None

    @torch.no_grad()
    def evaluate(self, loss_on: Callable[[Batch], torch.Tensor]) -> dict:
        """eval_loss, and bayes_loss and excess_loss where known, with `loss_on(batch) -> mean loss` (the model's)."""
        total = sum(float(loss_on(b)) * n for b, n in zip(self.batches, self.counts))
        eval_loss = total / sum(self.counts)
        if self.bayes_loss is None:
            return {"eval_loss": eval_loss}
        return {"eval_loss": eval_loss, "bayes_loss": self.bayes_loss, "excess_loss": eval_loss - self.bayes_loss}
