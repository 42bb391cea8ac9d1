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

from nanollama.kernels.scan import linear_scan_log
from nanollama.models.recurrent import RecurrentConfig, RecurrentLM, ResidualBlock
from nanollama.models.recurrent.config import positive
from nanollama.models.recurrent.layers import g, log_g, padding_to_identity


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

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"h": (batch_size, self.width)}

    def scan_flops(self) -> float:
        return 16.0 * self.width

    def initial_value(self, name, shape, seed, index):
        return None

    resets = True  # at packed document starts (positions == 0): log a = -inf, h_t = b_t

    def forward(self, x: torch.Tensor, state=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        kf, ki, pre = self.in_proj(x).float().chunk(3, dim=-1)  # (B, S, E) each, in float32
        d = F.softplus(-kf) - F.softplus(-ki)
        if state is not None and state.decoding:
            f, i = torch.sigmoid(-d[:, 0]), torch.sigmoid(d[:, 0])  # normalised gates, f + i = 1
            h = f * state.get("h") + i * g(pre[:, 0])  # (B, E)
            state.set("h", h)
            return self.out_proj(h[:, None].to(x.dtype))
        log_a, log_b = -F.softplus(d), -F.softplus(-d) + log_g(pre)
        log_a, log_b = padding_to_identity(None if state is None else state.valid, log_a, log_b, 0.0, float("-inf"))
        if positions is not None:
            log_a = log_a.masked_fill((positions == 0)[..., None], float("-inf"))
        log_h, log_last = linear_scan_log(log_a, log_b)  # (B, S, E), (B, E)
        if state is not None:
            state.set("h", log_last.exp())
        return self.out_proj(log_h.exp().to(x.dtype))


ACTIVATION = "silu"  # of the gated MLP


def check_fields(cfg) -> None:
    """The mixer's fields (shared with a hybrid's config)."""
    positive(cfg, "expand")


def make_mixer(cfg) -> MinLSTM:
    return MinLSTM(cfg.dim, cfg.expand * cfg.dim)


def build(cfg: MinLSTMConfig) -> RecurrentLM:
    return RecurrentLM(cfg, lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, make_mixer(cfg)))
