"""The training loss: next-token cross-entropy over a batch's scored targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollama.data.batch import IGNORE, Batch


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's scored targets (IGNORE elsewhere)."""
    logits = model(batch.inputs, mask=batch.mask, positions=batch.positions)  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1), ignore_index=IGNORE)
