"""Pieces every recurrent model shares: the causal depthwise conv (with its generation state), the
gated MLP, the pre-norm residual block and the log-space gate g of minGRU / minLSTM."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollama.kernels.scan import linear_scan_log
from nanollama.models.transformer.model import RMSNorm


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), g(x) = x + 0.5 for x >= 0 else sigmoid(x) (Feng et al. 2024): positive and continuous."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def padding_to_identity(valid: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, one=1.0, zero=0.0):
    """Make the steps at padded positions (valid False) identities, h_t = h_{t-1}, so that a right-padded
    prompt's final state is the state at its own last token. valid (B, S) bool; a, b (B, S, ...)."""
    if valid is None:
        return a, b
    v = valid.view(*valid.shape, *([1] * (a.dim() - 2)))
    return torch.where(v, a, one), torch.where(v, b, zero)


def gated_log_scan(gate: torch.Tensor, pre: torch.Tensor, state=None, positions: torch.Tensor | None = None):
    """h_t = (1 - z_t) h_{t-1} + z_t g(pre_t) with z = sigmoid(gate), the recurrence minGRU and minLSTM share.

    gate, pre: (B, S, E) float32. Training runs the log-space scan (log(1 - z) = -softplus(gate),
    log z = -softplus(-gate)), restarting at packed document starts (positions == 0: log a = -inf);
    generation (state.decoding) takes one sequential step. Returns h (B, S, E) float32; sets state "h".
    """
    if state is not None and state.decoding:
        z = torch.sigmoid(gate[:, 0])
        h = (1 - z) * state.get("h") + z * g(pre[:, 0])  # (B, E)
        state.set("h", h)
        return h[:, None]
    log_a, log_b = -F.softplus(gate), -F.softplus(-gate) + log_g(pre)  # log(1 - z), log(z h~)
    log_a, log_b = padding_to_identity(None if state is None else state.valid, log_a, log_b, 0.0, float("-inf"))
    if positions is not None:
        log_a = log_a.masked_fill((positions == 0)[..., None], float("-inf"))
    log_h, log_last = linear_scan_log(log_a, log_b)  # (B, S, E), (B, E)
    if state is not None:
        state.set("h", log_last.exp())
    return log_h.exp()


class StateSite(nn.Module):
    """Where a mixer shows its recurrent state to forward hooks (the probe's "state" site): the identity,
    no parameters, so checkpoints and results are unchanged. Input and output (B, S, F): the numbers the
    layer carries from step t to t + 1, per token (conv windows excluded)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h

    @property
    def watched(self) -> bool:
        """Whether a hook reads the site: a mixer whose per-token state training never materialises
        (Mamba-2's SSD) builds it only then."""
        return bool(self._forward_hooks or self._forward_pre_hooks)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time, (B, S, C) -> (B, S, C); weight (C, 1, W), bias (C,).

    Generation state "conv": the last W - 1 inputs (B, W - 1, C), so a decode step equals the
    training convolution at that position.
    """

    def __init__(self, channels: int, width: int, name: str = "conv"):
        super().__init__()
        self.channels, self.width, self.state_name = channels, width, name
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.empty(channels))

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {self.state_name: (batch_size, self.width - 1, self.channels)}

    def forward(self, u: torch.Tensor, state=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """positions (B, S), in training under document packing: tap k reads u[t - k] only if
        positions[t] >= k (the same document), so each document starts with a zero window."""
        B, S, C = u.shape
        if state is not None and state.decoding:
            window = torch.cat([state.get(self.state_name).to(u.dtype), u], dim=1)  # (B, W, C)
            state.set(self.state_name, window[:, 1:])
            out = (window * self.weight[:, 0].t().to(u.dtype)).sum(1, keepdim=True) + self.bias.to(u.dtype)
            return out  # (B, 1, C)
        padded = F.pad(u, (0, 0, self.width - 1, 0))  # (B, W - 1 + S, C): zeros before the first token
        if state is not None:  # a prefill: keep the last W - 1 real inputs of each row
            lengths = state.lengths(B, S, u.device)  # (B,) real tokens per row
            idx = lengths[:, None] + torch.arange(self.width - 1, device=u.device)[None, :]  # (B, W - 1)
            state.set(self.state_name, padded.gather(1, idx[:, :, None].expand(-1, -1, C)))
        if positions is not None and self.width > 1:
            windows = padded.unfold(1, self.width, 1)  # (B, S, C, W): window j reads u[t - (W - 1 - j)]
            lag = torch.arange(self.width - 1, -1, -1, device=u.device)  # (W,)
            keep = (positions[:, :, None] >= lag).to(u.dtype)[:, :, None, :]  # (B, S, 1, W)
            return (windows * keep * self.weight[:, 0].to(u.dtype)).sum(-1) + self.bias.to(u.dtype)
        out = F.conv1d(padded.transpose(1, 2), self.weight.to(u.dtype), self.bias.to(u.dtype), groups=C)  # (B, C, S)
        return out.transpose(1, 2)


class GatedMLP(nn.Module):
    """w2(act(w1 x) * w3 x): SwiGLU (act = silu) or GeGLU (act = gelu, Griffin's MLP)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.act = F.silu if activation == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)), then x + MLP(norm(x)) (Griffin's residual block; Mamba-2's with an MLP).

    Called like the Transformer's Block (x, cos, sin, mask, positions, cache) so a hybrid runs both
    in one loop; a recurrent mixer reads x, its layer state (`cache`) and, if it supports resets
    (`mixer.resets`), the positions of packed documents.
    """

    def __init__(self, dim: int, hidden_dim: int, norm_eps: float, mixer: nn.Module, activation: str = "silu"):
        super().__init__()
        self.mixer_norm = RMSNorm(dim, norm_eps)
        self.mixer = mixer
        if hidden_dim > 0:
            self.ffn_norm = RMSNorm(dim, norm_eps)
            self.feed_forward = GatedMLP(dim, hidden_dim, activation)

    def forward(self, x, cos=None, sin=None, mask=None, positions=None, cache=None):
        # positions reach a recurrent mixer only to reset it where a packed document starts (position 0);
        # generation (a state) never packs documents.
        resets = positions if cache is None and positions is not None and getattr(self.mixer, "resets", False) else None
        x = x + self.mixer(self.mixer_norm(x), cache, resets)
        if hasattr(self, "feed_forward"):
            x = x + self.feed_forward(self.ffn_norm(x))
        return x
