"""Mamba-2 (Dao & Gu 2024): the SSD layer of the reference minimal formulation, in residual blocks
(with a SwiGLU MLP when hidden_dim > 0, as in Mamba-2 hybrids; hidden_dim=0 gives the pure stack).

    z, xBC, dt = in_proj(u);  x, B, C = silu(conv(xBC));  dt = softplus(dt + dt_bias);  A = -exp(A_log)
    y = SSD(x, dt, A, B, C) + D * x;  out = out_proj(RMSNorm(y * silu(z)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollama.kernels.scan import ssd_scan, ssd_step
from nanollama.models.recurrent import (
    CausalConv1d,
    RecurrentConfig,
    RecurrentLM,
    ResidualBlock,
    StateSite,
    seeded_uniform,
)
from nanollama.models.recurrent.config import positive
from nanollama.models.transformer.model import RMSNorm
from nanollama.utils.checks import check

MAX_CONV_WIDTH = 16


@dataclass
class Mamba2Config(RecurrentConfig):
    arch: Literal["mamba2"] = "mamba2"  # the model family (nanollama.models registry)
    expand: int = 2  # inner width = expand * dim
    state_dim: int = 16  # N, the SSM state per head and channel
    ssm_head_dim: int = 16  # P, channels per SSM head (heads = expand * dim / P)
    n_groups: int = 1  # G, groups sharing B and C (must divide the heads)
    conv_width: int = 4  # causal depthwise conv over x, B, C; 1..16
    chunk_size: int = 64  # SSD chunk length (speed and memory only: the result does not depend on it)

    def __post_init__(self):
        super().__post_init__()
        check_fields(self)


def check_fields(cfg) -> None:
    """The mixer's fields (shared with a hybrid's config)."""
    for name in ("expand", "state_dim", "ssm_head_dim", "n_groups", "chunk_size"):
        positive(cfg, name)
    check(
        1 <= cfg.conv_width <= MAX_CONV_WIDTH,
        "conv_width",
        f"must be in [1, {MAX_CONV_WIDTH}], got {cfg.conv_width}",
    )
    width = cfg.expand * cfg.dim
    check(width % cfg.ssm_head_dim == 0, "ssm_head_dim", f"must divide expand * dim = {width}, got {cfg.ssm_head_dim}")
    heads = width // cfg.ssm_head_dim
    check(heads % cfg.n_groups == 0, "n_groups", f"must divide the SSM heads ({heads}), got {cfg.n_groups}")


class SSD(nn.Module):
    """Mamba-2's mixer (B, S, dim) -> (B, S, dim); states "h" (B, H, P, N) and "conv" (B, W - 1, E + 2GN)."""

    def __init__(self, dim: int, width: int, state_dim: int, head_dim: int, groups: int, conv_width: int, chunk: int):
        super().__init__()
        self.width, self.N, self.P, self.G, self.chunk = width, state_dim, head_dim, groups, chunk
        self.H = width // head_dim
        self.conv_channels = width + 2 * groups * state_dim
        self.in_proj = nn.Linear(dim, width + self.conv_channels + self.H, bias=False)  # z, xBC, dt
        self.conv = CausalConv1d(self.conv_channels, conv_width)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm = RMSNorm(width, 1e-5)
        self.out_proj = nn.Linear(width, dim, bias=False)
        self.state_site = StateSite()  # S_t flattened (B, S, H * P * N), built only when a probe hooks it

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"h": (batch_size, self.H, self.P, self.N), **self.conv.state_shapes(batch_size)}

    def scan_flops(self) -> float:
        # chunked SSD per token, not in 6N: intra-chunk C B^T and its product with x (2 * 2 * L * (N + P)
        # per head), the chunk states in and out (2 * 2 * 2 * P * N per head)
        per_head = 4.0 * self.chunk * (self.N + self.P) + 8.0 * self.P * self.N
        return self.H * per_head

    def initial_value(self, name, shape, seed, index):
        if name == "A_log":  # A = -exp(A_log) in [-16, -1]
            return torch.log(seeded_uniform(shape, 1.0, 16.0, seed, index))
        if name == "dt_bias":  # softplus(dt_bias) log-uniform in [1e-3, 1e-1]: dt_bias = dt + log(-expm1(-dt))
            dt = torch.exp(seeded_uniform(shape, math.log(1e-3), math.log(1e-1), seed, index))
            return dt + torch.log(-torch.expm1(-dt))
        if name == "D":
            return torch.ones(shape)
        return None

    resets = True  # at packed document starts (positions == 0): a fresh conv window and the SSD state dropped

    def forward(self, u: torch.Tensor, state=None, positions=None) -> torch.Tensor:
        Bsz, S, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.width, self.conv_channels, self.H], dim=-1)
        xbc = F.silu(self.conv(xbc, state, positions))  # (B, S, E + 2GN)
        x, Bm, Cm = xbc.float().split([self.width, self.G * self.N, self.G * self.N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, S, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        x = x.view(Bsz, S, self.H, self.P)
        Bm, Cm = Bm.view(Bsz, S, self.G, self.N), Cm.view(Bsz, S, self.G, self.N)
        if state is not None and state.decoding:
            y, h = ssd_step(state.get("h"), x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])  # (B, H, P), (B, H, P, N)
            state.set("h", h)
            if self.state_site.watched:
                self.state_site(h.reshape(Bsz, 1, -1))
            y = y[:, None]
        else:
            if state is not None and state.valid is not None:
                dt = torch.where(state.valid[..., None], dt, 0.0)  # dt = 0: decay 1, no input at padding
            reset = None if positions is None else positions == 0  # (B, S): a document starts, its state is zero
            y, last = ssd_scan(x, dt, A, Bm, Cm, chunk_size=self.chunk, reset=reset)  # (B, S, H, P), (B, H, P, N)
            if state is not None:
                state.set("h", last)
            if self.state_site.watched:
                self.state_site(self._states(x, dt, A, Bm, Cm, reset))
        y = y + self.D.float()[:, None] * x  # the D skip
        y = y.reshape(Bsz, S, self.width).to(u.dtype)
        return self.out_proj(self.norm(y * F.silu(z)))  # gated RMSNorm

    def _states(self, x, dt, A, Bm, Cm, reset) -> torch.Tensor:
        """Every step's state S_t (B, S, H * P * N), by the one-token step: the chunked scan keeps only
        the chunk boundaries' states, and a probe reads all of them (no grad, float32)."""
        Bsz, S = x.shape[:2]
        h = x.new_zeros(Bsz, self.H, self.P, self.N)
        out = []
        with torch.no_grad():
            for t in range(S):
                if reset is not None:
                    h = torch.where(reset[:, t, None, None, None], 0.0, h)
                _, h = ssd_step(h, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])  # (B, H, P, N)
                out.append(h.reshape(Bsz, -1))
        return torch.stack(out, 1)


ACTIVATION = "silu"


def make_mixer(cfg) -> SSD:
    width = cfg.expand * cfg.dim
    return SSD(cfg.dim, width, cfg.state_dim, cfg.ssm_head_dim, cfg.n_groups, cfg.conv_width, cfg.chunk_size)


def build(cfg: Mamba2Config) -> RecurrentLM:
    return RecurrentLM(cfg, lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, make_mixer(cfg)))
