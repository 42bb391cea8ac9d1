"""Hawk (De et al. 2024, Griffin): residual blocks of the RG-LRU recurrent block and a GeGLU MLP.

Recurrent block: y = W_out(gelu(W_g x) * RG-LRU(conv(W_x x))). RG-LRU, per channel:
    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_i u_t + b_i)        (block-diagonal W_a, W_i)
    a_t = sigma(Lambda)^(c r_t), c = 8  (log a_t = -c r_t softplus(-Lambda))
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t * u_t)
Lambda starts so that a^c is uniform in [0.9, 0.999], as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollama.kernels.scan import linear_scan
from nanollama.models.recurrent import (
    CausalConv1d,
    RecurrentConfig,
    RecurrentLM,
    ResidualBlock,
    StateSite,
    seeded_uniform,
)
from nanollama.models.recurrent.config import positive
from nanollama.utils.checks import check

C_EXPONENT = 8.0
MAX_CONV_WIDTH = 16


@dataclass
class HawkConfig(RecurrentConfig):
    arch: Literal["hawk"] = "hawk"  # the model family (nanollama.models registry)
    expand: int = 1  # RG-LRU width = expand * dim (the paper uses about 4/3)
    conv_width: int = 4  # temporal conv before the RG-LRU, 1..16 (the paper uses 4)
    lru_heads: int = 4  # blocks of the block-diagonal gate matrices (must divide the RG-LRU width)

    def __post_init__(self):
        super().__post_init__()
        check_fields(self)


def check_fields(cfg) -> None:
    """The mixer's fields (shared with a hybrid's config)."""
    positive(cfg, "expand")
    check(
        1 <= cfg.conv_width <= MAX_CONV_WIDTH,
        "conv_width",
        f"must be in [1, {MAX_CONV_WIDTH}], got {cfg.conv_width}",
    )
    positive(cfg, "lru_heads")
    width = cfg.expand * cfg.dim
    check(width % cfg.lru_heads == 0, "lru_heads", f"must divide expand * dim = {width}, got {cfg.lru_heads}")


class RGLRU(nn.Module):
    """Griffin's recurrent block (B, S, dim) -> (B, S, dim); states "h" (B, E) and "conv" (B, W - 1, E)."""

    def __init__(self, dim: int, width: int, conv_width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj = nn.Linear(dim, 2 * width, bias=False)  # the recurrent branch and the gelu gate branch
        self.conv = CausalConv1d(width, conv_width)
        block = width // heads
        self.gate_a = nn.Parameter(torch.empty(heads, block, block))  # recurrence gate, block-diagonal
        self.gate_a_bias = nn.Parameter(torch.empty(width))
        self.gate_x = nn.Parameter(torch.empty(heads, block, block))  # input gate
        self.gate_x_bias = nn.Parameter(torch.empty(width))
        self.decay = nn.Parameter(torch.empty(width))  # Lambda
        self.out_proj = nn.Linear(width, dim, bias=False)
        self.state_site = StateSite()  # the RG-LRU's h (B, S, E), for probes

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"h": (batch_size, self.width), **self.conv.state_shapes(batch_size)}

    def scan_flops(self) -> float:
        # elementwise gates and recurrence (order of magnitude); the gate matrices and the conv are in 6N
        return 20.0 * self.width

    def initial_value(self, name, shape, seed, index):
        if name == "decay":  # a^c ~ U(0.9, 0.999): a = u^(1/c), Lambda = logit(a)
            a = seeded_uniform(shape, 0.9, 0.999, seed, index) ** (1.0 / C_EXPONENT)
            return torch.log(a) - torch.log1p(-a)
        if name in ("gate_a", "gate_x"):
            return seeded_uniform(shape, -1.0, 1.0, seed, index) / math.sqrt(shape[-1])
        return None

    def _gate(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        B, S, _ = u.shape
        blocks = u.view(B, S, self.heads, -1)  # (B, S, heads, block)
        return torch.sigmoid(torch.einsum("bshi,hij->bshj", blocks, w.to(u.dtype)).reshape(B, S, -1) + b)

    resets = True  # at packed document starts (positions == 0): a fresh conv window and a = 0

    def forward(self, x: torch.Tensor, state=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        u, gate = self.in_proj(x).chunk(2, dim=-1)  # (B, S, E) each
        u = self.conv(u, state, positions).float()
        r = self._gate(u, self.gate_a.float(), self.gate_a_bias.float())
        i = self._gate(u, self.gate_x.float(), self.gate_x_bias.float())
        log_a = -C_EXPONENT * r * F.softplus(-self.decay.float())  # (B, S, E), <= 0
        a = torch.exp(log_a)
        # sqrt(1 - a^2) from expm1 (exact near a = 1); the clamp keeps the gradient finite at a = 1
        b = torch.sqrt((-torch.expm1(2 * log_a)).clamp_min(1e-12)) * (i * u)
        if state is not None and state.decoding:
            h = a[:, 0] * state.get("h") + b[:, 0]  # (B, E)
            state.set("h", h)
            h = h[:, None]
        else:
            if state is not None and state.valid is not None:
                v = state.valid[..., None]
                a, b = torch.where(v, a, 1.0), torch.where(v, b, 0.0)  # padded steps leave h unchanged
            if positions is not None:  # b keeps its sqrt(1 - a^2) of the real a, as at a sequence's start
                a = a.masked_fill((positions == 0)[..., None], 0.0)
            h, last = linear_scan(a, b)  # (B, S, E), (B, E)
            if state is not None:
                state.set("h", last)
        return self.out_proj(F.gelu(gate) * self.state_site(h).to(x.dtype))


ACTIVATION = "gelu"  # Griffin's MLP is GeGLU


def make_mixer(cfg) -> RGLRU:
    return RGLRU(cfg.dim, cfg.expand * cfg.dim, cfg.conv_width, cfg.lru_heads)


def build(cfg: HawkConfig) -> RecurrentLM:
    return RecurrentLM(cfg, lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, make_mixer(cfg), ACTIVATION))
