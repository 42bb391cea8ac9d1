"""Linear recurrences: the elementwise scan h_t = a_t * h_{t-1} + b_t (minGRU, minLSTM, RG-LRU), its
log-space form, and Mamba-2's SSD (its chunked form lives in ssd.py and is re-exported here).

Layers, top to bottom: `linear_scan` (public; checks the inputs once and dispatches), then one route:
`_LinearScan`, an autograd.Function whose forward and backward call either the `nanollama::linear_scan`
torch ops (Triton: launchers and ops in _scan_launch.py, kernels in _scan_triton.py; fake impls so
torch.compile traces them) or the eager chunked scan (_scan_eager.py). The backward is the reverse scan:
dh_t = g_t + a_{t+1} dh_{t+1}, grad_b = dh, grad_a = dh * h_{t-1}. `linear_scan_log` (_LogScan) reuses
that backward with a = d log h_t / d log h_{t-1}. Beside them the sequential references `linear_scan_ref`,
`linear_scan_log_ref` and `ssd_scan_ref` (loops over T, exact in float64) and one-token steps for generation.
"""

from __future__ import annotations

import torch

from nanollama.kernels import _scan_launch  # noqa: F401  (registers the nanollama::linear_scan ops)
from nanollama.kernels._scan_eager import chunked_scan, eager_backward, eager_forward
from nanollama.kernels.dispatch import use_triton
from nanollama.kernels.ssd import ssd_scan, ssd_scan_ref, ssd_step

__all__ = [
    "linear_scan",
    "linear_scan_log",
    "linear_scan_log_ref",
    "linear_scan_log_step",
    "linear_scan_ref",
    "linear_scan_step",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_step",
]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check(name: str, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.dtype:
    """Shape, dtype and device checks shared by every path (shape-only: safe while tracing); returns the
    dtype a, b and h0 are cast to: the promotion of a's and b's (under autocast they may differ)."""
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"{name}: a and b must be (B, T, C) of one shape; got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype not in _DTYPES or b.dtype not in _DTYPES:
        raise ValueError(f"{name}: a and b must have a float dtype (fp16/bf16/fp32/fp64); got {a.dtype}, {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name}: a and b must be on one device; got {a.device}, {b.device}")
    if h0 is not None:
        B, _, C = a.shape
        if h0.shape != (B, C) or h0.device != a.device:
            raise ValueError(
                f"{name}: h0 must be (B, C) = ({B}, {C}) on {a.device}; got {tuple(h0.shape)} on {h0.device}"
            )
    return torch.promote_types(a.dtype, b.dtype)


# ----------------------------------------------------------------------------- sequential references


def linear_scan_ref(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + b_t by a loop over T (math in float32, float64 for float64 inputs)."""
    dtype = _check("linear_scan_ref", a, b, h0)
    compute = _compute_dtype(dtype)
    h = torch.zeros(a.shape[0], a.shape[2], dtype=compute, device=a.device) if h0 is None else h0.to(compute)
    out = []
    for t in range(a.shape[1]):
        h = a[:, t].to(compute) * h + b[:, t].to(compute)
        out.append(h)
    hs = torch.stack(out, 1) if out else a.new_empty(a.shape, dtype=compute)  # (B, T, C)
    return hs.to(dtype), h.to(dtype)


def linear_scan_log_ref(
    log_a: torch.Tensor, log_b: torch.Tensor, log_h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log h_t = logaddexp(log_a_t + log h_{t-1}, log_b_t) by a loop over T (h0 = 0 when log_h0 is None)."""
    dtype = _check("linear_scan_log_ref", log_a, log_b, log_h0)
    compute = _compute_dtype(dtype)
    B, T, C = log_a.shape
    lh = None if log_h0 is None else log_h0.to(compute)
    out = []
    for t in range(T):
        lb = log_b[:, t].to(compute)
        lh = lb if lh is None else torch.logaddexp(log_a[:, t].to(compute) + lh, lb)
        out.append(lh)
    if lh is None:  # T == 0 and no initial state: h = 0
        lh = torch.full((B, C), float("-inf"), dtype=compute, device=log_a.device)
    hs = torch.stack(out, 1) if out else log_a.new_empty(log_a.shape, dtype=compute)
    return hs.to(dtype), lh.to(dtype)


# ----------------------------------------------------------------------------- one-token steps


def linear_scan_step(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One generation step: state h (B, C), inputs a_t, b_t (B, C) -> (output h_t, new state h_t)."""
    h_new = a * h + b
    return h_new, h_new


def linear_scan_log_step(
    log_h: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the log-space recurrence: (B, C) each -> (log h_t, new state log h_t)."""
    lh = torch.logaddexp(log_a + log_h, log_b)
    return lh, lh


def _forward(a, b, h0, triton: bool):
    if triton:
        return torch.ops.nanollama.linear_scan(a, b, h0, False)
    h = eager_forward(a, b, h0)
    return h, h[:, -1].clone()


def _backward(a, h, h0, grad_h, grad_last, triton: bool):
    if triton:
        return torch.ops.nanollama.linear_scan_bwd(a, h, h0, grad_h, grad_last)
    return eager_backward(a, h, h0, grad_h, grad_last)


class _LinearScan(torch.autograd.Function):
    """The scan's autograd: saves a, h and h0 (not b); the backward is one reverse scan."""

    @staticmethod
    def forward(ctx, a, b, h0, triton: bool):
        h, h_last = _forward(a, b, h0, triton)
        ctx.save_for_backward(a, h, h0)
        ctx.triton = triton
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(h)
        if grad_last is None:
            grad_last = torch.zeros_like(h[:, -1])
        grad_a, grad_b, grad_h0 = _backward(a, h, h0, grad_h, grad_last, ctx.triton)
        return grad_a, grad_b, None if h0 is None else grad_h0.to(h0.dtype), None


# ----------------------------------------------------------------------------- public


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + b_t elementwise; returns (h (B, T, C), h_last (B, C)).

    a, b: (B, T, C), fp16/bf16/fp32/fp64 (two dtypes are promoted to one, as under autocast; math in
    fp32 at least; results in that dtype); h0: (B, C) or None (zeros). h_last = h[:, -1], or h0
    (zeros) when T == 0. Differentiable in a, b and h0. Triton on CUDA tensors (NANOLLAMA_KERNELS,
    nanollama.kernels.dispatch), else the eager chunked scan (O(T) work in ~2 sqrt(T) vectorised steps;
    exact for any a, including zeros and negatives).
    """
    dtype = _check("linear_scan", a, b, h0)
    a, b = a.to(dtype), b.to(dtype)
    h0 = None if h0 is None else h0.to(dtype)
    B, T, C = a.shape
    if T == 0:
        last = torch.zeros(B, C, dtype=a.dtype, device=a.device) if h0 is None else h0
        return a.new_empty(a.shape) + 0 * b, last  # keeps the graph connected to a and b
    tensors = (a, b) if h0 is None else (a, b, h0)
    return _LinearScan.apply(a, b, h0, use_triton(*tensors))


class _LogScan(torch.autograd.Function):
    """log h_t = logaddexp(log_a_t + log h_{t-1}, log_b_t). Its backward is a linear reverse scan:
    d log h_t / d log h_{t-1} = w_t = exp(log_a_t + log h_{t-1} - log h_t) in [0, 1], and
    d log h_t / d log b_t = exp(log_b_t - log h_t); so it reuses linear_scan's backward with a = w."""

    @staticmethod
    def forward(ctx, la, lb, lh0, triton: bool):
        if triton:
            lh, _ = torch.ops.nanollama.linear_scan(la, lb, lh0, True)  # (B, T, C) float32
        else:
            compute = _compute_dtype(la.dtype)
            lh = chunked_scan(la.to(compute), lb.to(compute), None if lh0 is None else lh0.to(compute), log=True)
        ctx.save_for_backward(la, lb, lh0, lh)
        ctx.triton = triton
        out = lh.to(la.dtype)
        return out, out[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_lh, grad_last):
        la, lb, lh0, lh = ctx.saved_tensors
        compute = lh.dtype
        if grad_lh is None:
            grad_lh = torch.zeros_like(lh)
        if grad_last is None:
            grad_last = torch.zeros_like(lh[:, -1])
        first = torch.full_like(lh[:, :1], float("-inf")) if lh0 is None else lh0.to(compute)[:, None]
        lh_prev = torch.cat((first, lh[:, :-1]), 1)  # (B, T, C): log h_{t-1}
        # w = 0 where h_{t-1} = 0; nan (-inf - -inf) where h_t = 0 too, which carries no gradient
        w = torch.nan_to_num(torch.exp(la.to(compute) + lh_prev - lh), nan=0.0)  # (B, T, C)
        # dL/d log h_t over all paths = grad_b of the linear scan with a = w (h there is only a placeholder)
        _, dh, _ = _backward(w, w, None, grad_lh.to(compute), grad_last.to(compute), ctx.triton)
        dh = dh.to(compute)
        grad_la = dh * w
        grad_lb = dh * torch.nan_to_num(torch.exp(lb.to(compute) - lh), nan=0.0)
        grad_lh0 = None if lh0 is None else (dh[:, 0] * w[:, 0]).to(lh0.dtype)
        return grad_la.to(la.dtype), grad_lb.to(lb.dtype), grad_lh0, None


def linear_scan_log(
    log_a: torch.Tensor, log_b: torch.Tensor, log_h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan in log space for positive b and h (minGRU/minLSTM's parallel form): returns
    (log_h (B, T, C), log_h_last (B, C)) with log h_t = logaddexp(log_a_t + log h_{t-1}, log_b_t).

    log_a, log_b: (B, T, C); log_h0: (B, C) or None (h0 = 0). Only logaddexps and sums of log a over
    one chunk: no exp of a sum that grows with T (the cumsum form's overflow), so it is stable at any T.
    Differentiable in all three.
    """
    dtype = _check("linear_scan_log", log_a, log_b, log_h0)
    log_a, log_b = log_a.to(dtype), log_b.to(dtype)
    log_h0 = None if log_h0 is None else log_h0.to(dtype)
    B, T, C = log_a.shape
    if T == 0:
        last = torch.full((B, C), float("-inf"), dtype=log_a.dtype, device=log_a.device) if log_h0 is None else log_h0
        return log_a.new_empty(log_a.shape) + 0 * log_b, last
    tensors = (log_a, log_b) if log_h0 is None else (log_a, log_b, log_h0)
    return _LogScan.apply(log_a, log_b, log_h0, use_triton(*tensors))
