"""Attention with masks (eager backends for now)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nanollama.kernels.masks import Causal


def attention_ref(q, k, v, mask=None, scale=None):
    """Eager attention with a float32 softmax. q (B, Hq, Sq, D), k and v (B, Hk, Skv, D)."""
    B, Hq, Sq, D = q.shape
    Hk, Skv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(Hq // Hk, dim=1)  # (B, Hq, Skv, D)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hq, Sq, Skv)
    if mask is not None:
        allowed = mask.dense(B, Sq, Skv, device=q.device)[:, None]  # (B, 1, Sq, Skv)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention(q, k, v, mask=None, scale=None):
    """q (B, Hq, Sq, D), k and v (B, Hk, Skv, D) -> (B, Hq, Sq, D)."""
    if isinstance(mask, Causal) and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return attention_ref(q, k, v, mask, scale)
