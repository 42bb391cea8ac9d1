"""Rotary position embeddings: the frequency table and the rotation (eager for now)."""

from __future__ import annotations

import torch


def rope_frequencies(
    seq_len: int, head_dim: int, theta: float = 10000.0, scaling: dict | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim // 2) float32, cos[p, i] = cos(p * theta^(-2i/head_dim))."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if scaling:
        raise ValueError(f"rope scaling {scaling!r} is not supported yet")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None):
    """Rotate x (B, S, H, D) by the half-split convention, math in float32, result in x's dtype."""
    B, S = x.shape[:2]
    if positions is None:
        c, s = cos[:S][None, :, None, :], sin[:S][None, :, None, :]  # (1, S, 1, D/2)
    else:
        c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # (B, S, 1, D/2)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def apply_rope(q, k, cos, sin, positions=None):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D); returns (q_out, k_out)."""
    return rope_ref(q, cos, sin, positions), rope_ref(k, cos, sin, positions)
