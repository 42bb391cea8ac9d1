"""Attention masks (only causal for now)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Causal:
    """Query i sees key j iff j <= i (queries aligned to the end of the keys when Sq < Skv)."""

    def dense(self, batch: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        """Boolean (B, Sq, Skv), True where attention is allowed."""
        i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        j = torch.arange(kv_len, device=device)[None, :]
        return (j <= i).expand(batch, q_len, kv_len)


def causal() -> Causal:
    return Causal()
