"""minLSTM (Feng et al. 2024): forget and input gates from x_t alone, normalised to sum to one, so
training is a parallel scan in log space; generation is the sequential step.

    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t),  h_t = f'_t h_{t-1} + i'_t g(W_h x_t)
with f = sigmoid(W_f x), i = sigmoid(W_i x); in logs, with d = softplus(-k_f) - softplus(-k_i):
log f' = -softplus(d), log i' = -softplus(-d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollama.models.recurrent import RecurrentConfig, RecurrentLM, ResidualBlock
from nanollama.models.recurrent.config import positive
from nanollama.models.recurrent.layers import StateSite, gated_log_scan


@dataclass
class MinLSTMConfig(RecurrentConfig):
    arch: Literal["minlstm"] = "minlstm"  # the model family (nanollama.models registry)
    expand: int = 1  # recurrent width = expand * dim (the state per layer and sequence)

    def __post_init__(self):
        super().__post_init__()
        check_fields(self)


class MinLSTM(nn.Module):
    """(B, S, dim) -> (B, S, dim); state "h" (B, E) float32, positive."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.in_proj = nn.Linear(dim, 3 * width, bias=False)  # forget, input and candidate pre-activations
        self.out_proj = nn.Linear(width, dim, bias=False)
        self.state_site = StateSite()  # h (B, S, E), for probes

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"h": (batch_size, self.width)}

    def scan_flops(self) -> float:
        return 16.0 * self.width

    def initial_value(self, name, shape, seed, index):
        return None

    resets = True  # at packed document starts (positions == 0): log a = -inf, h_t = b_t

    def forward(self, x: torch.Tensor, state=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        kf, ki, pre = self.in_proj(x).float().chunk(3, dim=-1)  # (B, S, E) each, in float32
        d = F.softplus(-kf) - F.softplus(-ki)  # the input gate i' = sigmoid(d), the forget gate 1 - i'
        return self.out_proj(self.state_site(gated_log_scan(d, pre, state, positions)).to(x.dtype))


ACTIVATION = "silu"  # of the gated MLP


def check_fields(cfg) -> None:
    """The mixer's fields (shared with a hybrid's config)."""
    positive(cfg, "expand")


def make_mixer(cfg) -> MinLSTM:
    return MinLSTM(cfg.dim, cfg.expand * cfg.dim)


def build(cfg: MinLSTMConfig) -> RecurrentLM:
    return RecurrentLM(cfg, lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, make_mixer(cfg)))
