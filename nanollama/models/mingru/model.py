"""minGRU (Feng et al. 2024, "Were RNNs all we needed?"): gates from x_t alone, so training is a
parallel scan in log space; generation is the sequential step.

    z_t = sigmoid(W_z x_t),  h~_t = g(W_h x_t),  h_t = (1 - z_t) h_{t-1} + z_t h~_t
with g(x) = x + 0.5 (x >= 0) or sigmoid(x), which keeps h positive so log h is defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from nanollama.models.recurrent import RecurrentConfig, RecurrentLM, ResidualBlock
from nanollama.models.recurrent.config import positive
from nanollama.models.recurrent.layers import StateSite, gated_log_scan


@dataclass
class MinGRUConfig(RecurrentConfig):
    arch: Literal["mingru"] = "mingru"  # the model family (nanollama.models registry)
    expand: int = 1  # recurrent width = expand * dim (the state per layer and sequence)

    def __post_init__(self):
        super().__post_init__()
        check_fields(self)


class MinGRU(nn.Module):
    """(B, S, dim) -> (B, S, dim); state "h" (B, E) float32, positive."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.in_proj = nn.Linear(dim, 2 * width, bias=False)  # gate logits k and candidate pre-activation
        self.out_proj = nn.Linear(width, dim, bias=False)
        self.state_site = StateSite()  # h (B, S, E), for probes

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"h": (batch_size, self.width)}

    def scan_flops(self) -> float:
        return 12.0 * self.width  # gates, g and the scan's logaddexp, per token (order of magnitude)

    def initial_value(self, name, shape, seed, index):
        return None

    resets = True  # at packed document starts (positions == 0): log a = -inf, h_t = b_t

    def forward(self, x: torch.Tensor, state=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        k, pre = self.in_proj(x).float().chunk(2, dim=-1)
        return self.out_proj(self.state_site(gated_log_scan(k, pre, state, positions)).to(x.dtype))


ACTIVATION = "silu"  # of the gated MLP


def check_fields(cfg) -> None:
    """The mixer's fields (shared with a hybrid's config)."""
    positive(cfg, "expand")


def make_mixer(cfg) -> MinGRU:
    return MinGRU(cfg.dim, cfg.expand * cfg.dim)


def build(cfg: MinGRUConfig) -> RecurrentLM:
    return RecurrentLM(cfg, lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, make_mixer(cfg)))
