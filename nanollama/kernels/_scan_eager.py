"""The eager (CPU) form of the linear scans, private to scan.py: chunked, so O(T) work in about
2 sqrt(T) small vectorised steps, exact for any a (no division, no log of a).

Sequence (B, T, C) -> chunks (B, K, L, C) with L ~ sqrt(T): 1) a loop over the L positions scans every
chunk at once from a zero state; 2) a loop over the K chunks carries the state, each chunk acting as
one step (its product of a, its last local h); 3) one pass adds each chunk's carried-in state times
the running product of a. The log-space variant does the same with (+, logaddexp) in place of (*, +).
The padded tail is the identity ((1, 0); (0, -inf) in log space), so the carry passes through it.
Runs outside autograd (scan.py's autograd.Functions call it), so it writes in place.
"""

from __future__ import annotations

import math

import torch

__all__ = ["chunked_scan", "eager_backward", "eager_forward"]


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, log: bool = False) -> torch.Tensor:
    """h (B, T, C) with h_t = a_t h_{t-1} + b_t, h_{-1} = h0 (zeros when None); log: the inputs and h
    are logs and h_t = logaddexp(a_t + h_{t-1}, b_t), h_{-1} = -inf when None. T >= 1; a, b of one dtype."""
    B, T, C = a.shape
    L = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    K = -(-T // L)
    pad = K * L - T
    if pad:
        one, zero = (0.0, float("-inf")) if log else (1.0, 0.0)
        a = torch.cat((a, a.new_full((B, pad, C), one)), 1)
        b = torch.cat((b, b.new_full((B, pad, C), zero)), 1)
    a4, b4 = a.reshape(B, K, L, C), b.reshape(B, K, L, C)  # (B, K, L, C)
    h = torch.empty_like(b4, memory_format=torch.contiguous_format)
    h[:, :, 0] = b4[:, :, 0]
    for pos in range(1, L):  # 1) within every chunk at once, from a zero state (setitem: Dynamo refuses out=)
        if log:
            h[:, :, pos] = torch.logaddexp(a4[:, :, pos] + h[:, :, pos - 1], b4[:, :, pos])
        else:
            h[:, :, pos] = torch.addcmul(b4[:, :, pos], a4[:, :, pos], h[:, :, pos - 1])
    prefix = torch.cumsum(a4, 2) if log else torch.cumprod(a4, 2)  # (B, K, L, C): a_start..a_pos per chunk
    if h0 is not None:
        carry = h0.to(h.dtype)
    else:
        carry = h.new_full((B, C), float("-inf") if log else 0.0)
    carried = torch.empty(B, K, 1, C, dtype=h.dtype, device=h.device)  # the state entering each chunk
    for k in range(K):  # 2) across chunks
        carried[:, k, 0] = carry
        if log:
            carry = torch.logaddexp(prefix[:, k, -1] + carry, h[:, k, -1])
        else:
            carry = torch.addcmul(h[:, k, -1], prefix[:, k, -1], carry)
    if log:  # 3) the carried-in state through each chunk's running product
        h = torch.logaddexp(h, prefix + carried)
    else:
        h.addcmul_(prefix, carried)
    return h.view(B, K * L, C)[:, :T]


# ----------------------------------------------------------------------------- the scan's eager forward and backward


def eager_forward(a, b, h0):
    """h (B, T, C) in a's dtype; math in float32 at least."""
    compute = _compute(a.dtype)
    h = chunked_scan(a.to(compute), b.to(compute), None if h0 is None else h0.to(compute))  # (B, T, C)
    return h.to(a.dtype)


def eager_backward(a, h, h0, grad_h, grad_last):
    """(grad_a, grad_b, grad_h0) of the scan from dL/dh (B, T, C) and dL/dh_last (B, C)."""
    compute = _compute(a.dtype)
    af = a.to(compute)
    # dh_t = g_t + a_{t+1} dh_{t+1}, from dh_{T-1} = g_{T-1} + grad_last: the forward scan on the reversed
    # sequence with a shifted by one (a_T := 1) and grad_last (h_last is h[:, -1]) as its initial state
    a_next = torch.cat((af[:, 1:], torch.ones_like(af[:, :1])), 1)  # (B, T, C)
    dh = chunked_scan(a_next.flip(1), grad_h.to(compute).flip(1), grad_last.to(compute)).flip(1)
    first = torch.zeros_like(af[:, 0]) if h0 is None else h0.to(compute)
    h_prev = torch.cat((first[:, None], h[:, :-1].to(compute)), 1)  # (B, T, C): h_{t-1}
    grad_a = dh * h_prev
    grad_h0 = af[:, 0] * dh[:, 0]
    return grad_a.to(a.dtype), dh.to(a.dtype), grad_h0
