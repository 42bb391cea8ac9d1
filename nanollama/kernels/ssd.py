"""Mamba-2's SSD (state-space duality) scan: the chunked form, its sequential reference and the one-token
step. Re-exported by nanollama.kernels.scan.

Layers: `ssd_scan` (public; checks once and dispatches) -> either `_SSDScan`, an autograd.Function whose
forward is the `nanollama::ssd_scan` torch op (Triton: launcher and op in _ssd_launch.py, kernels in
_ssd_triton.py) and whose backward is the `nanollama::ssd_scan_bwd` op, or `_ssd_chunked`, the eager
chunked form (differentiable by autograd). Both take resets.

Per head h with state S (P, N): S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t.
Names: B (batch), T (time), H (heads), P (head dim), G (groups of B/C, H % G == 0), N (state size),
L (chunk length), K (number of chunks). The chunked form follows Dao & Gu's `ssd_minimal`: within a chunk
the quadratic (attention-like) form, between chunks a scan of the chunk states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollama.kernels import _ssd_launch  # also registers the nanollama::ssd_scan ops
from nanollama.kernels.dispatch import use_triton

__all__ = ["ssd_scan", "ssd_scan_ref", "ssd_step"]


def _check(name, x, dt, A, B, C, h0, chunk_size=1, reset=None) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be (B, T, H, P); got {tuple(x.shape)}")
    b, T, H, P = x.shape
    if dt.shape != (b, T, H):
        raise ValueError(f"{name}: dt must be (B, T, H) = ({b}, {T}, {H}); got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"{name}: A must be (H,) = ({H},); got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, T) or B.shape != C.shape:
        raise ValueError(
            f"{name}: B and C must be (B, T, G, N) with B, T = {b}, {T}; got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    G = B.shape[2]
    if G < 1 or H % G:
        raise ValueError(f"{name}: the heads H = {H} must be a multiple of the groups G = {G}")
    if h0 is not None and h0.shape != (b, H, P, B.shape[3]):
        raise ValueError(f"{name}: h0 must be (B, H, P, N) = ({b}, {H}, {P}, {B.shape[3]}); got {tuple(h0.shape)}")
    if reset is not None and (reset.shape != (b, T) or reset.dtype != torch.bool):
        raise ValueError(
            f"{name}: reset must be a (B, T) = ({b}, {T}) bool tensor; got {reset.dtype} {tuple(reset.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int; got {chunk_size!r}")
    devices = {t.device for t in (x, dt, A, B, C, h0, reset) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device; got {sorted(map(str, devices))}")


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): head h reads group h // (H // G)."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): out[i, j] = x[j+1] + ... + x[i] for i >= j, -inf above the diagonal.
    Sums of the entries themselves (not differences of a cumulative sum): no cancellation."""
    L = x.shape[-1]
    xx = x[..., None].expand(*x.shape, L)  # (..., L, L): xx[i, j] = x[i]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), -1)
    xx = xx.masked_fill(~below, 0)
    out = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), 0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence by a loop over T (math in float32, float64 for float64 x); chunk_size is ignored."""
    _check("ssd_scan_ref", x, dt, A, B, C, h0, chunk_size, reset)
    b, T, H, P = x.shape
    N = B.shape[3]
    compute = torch.promote_types(x.dtype, torch.float32)
    Bh, Ch = _heads(B, H).to(compute), _heads(C, H).to(compute)  # (B, T, H, N)
    xf, dtf, Af = x.to(compute), dt.to(compute), A.to(compute)
    S = torch.zeros(b, H, P, N, dtype=compute, device=x.device) if h0 is None else h0.to(compute)
    ys = []
    for t in range(T):
        if reset is not None:  # the sequence restarts at t: the state before it is dropped
            S = torch.where(reset[:, t, None, None, None], 0.0, S)
        y, S = _step(S, xf[:, t], dtf[:, t], Af, Bh[:, t], Ch[:, t])
        ys.append(y)
    y = torch.stack(ys, 1) if ys else xf.new_empty(x.shape)
    return y.to(x.dtype), S.to(x.dtype)


def _step(S, x, dt, A, B, C):
    """S (B, H, P, N), x (B, H, P), dt (B, H), A (H,), B and C (B, H, N) -> (y (B, H, P), new S)."""
    decay = torch.exp(dt * A)[:, :, None, None]  # (B, H, 1, 1)
    S = decay * S + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]  # (B, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", S, C)
    return y, S


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generation step: state (B, H, P, N), x (B, H, P), dt (B, H), A (H,), B and C (B, G, N)
    -> (y (B, H, P), new state). Math in float32 at least; results in state's dtype."""
    H = x.shape[1]
    compute = torch.promote_types(state.dtype, torch.float32)
    Bh, Ch = (_heads(t[:, None], H)[:, 0].to(compute) for t in (B, C))  # (B, H, N)
    y, S = _step(state.to(compute), x.to(compute), dt.to(compute), A.to(compute), Bh, Ch)
    return y.to(x.dtype), S.to(state.dtype)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's SSD, chunked: returns (y (B, T, H, P), h_last (B, H, P, N)).

    x (B, T, H, P); dt (B, T, H) positive (softplus already applied); A (H,) negative; B, C (B, T, G, N)
    with H % G == 0; h0 (B, H, P, N) or None (zeros). No D skip (the caller adds D * x). Any T: the
    last chunk is padded with dt = 0, which leaves the state unchanged. Math in float32 at least,
    results in x's dtype; differentiable in every input. Memory per chunk is O(L^2 H) for the decay
    matrix, so chunk_size trades that against the K^2 chunk-to-chunk matrix.

    reset: (B, T) bool or None: where True the sequence restarts (the state before t, h0 included, is
    dropped), for packed documents; the decay there becomes exp(-inf) = 0 inside and across chunks.

    Triton on CUDA tensors (NANOLLAMA_KERNELS, nanollama.kernels.dispatch) for 16/32-bit x (forward and
    backward kernels) for chunks up to 128 rows and P up to 128, not both over 64 (_ssd_launch.supports:
    larger tiles would not fit a GPU block's shared memory); else (float64, T == 0, larger tiles) the
    eager chunked form.
    """
    _check("ssd_scan", x, dt, A, B, C, h0, chunk_size, reset)
    if x.shape[1] > 0:
        tensors = [t for t in (x, dt, A, B, C, h0, reset) if t is not None]
        if use_triton(*tensors) and _ssd_launch.supports(min(chunk_size, x.shape[1]), x.shape[3]):
            return _SSDScan.apply(x, dt, A, B, C, h0, reset, chunk_size)
    return _ssd_chunked(x, dt, A, B, C, h0, chunk_size, reset)


class _SSDScan(torch.autograd.Function):
    """The Triton route: saves the inputs and the state entering each chunk (B, K, H, P, N) float32."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, reset, chunk_size: int):
        y, last, states = torch.ops.nanollama.ssd_scan(x, dt, A, B, C, h0, reset, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, h0, reset, states)
        ctx.chunk_size = chunk_size
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        x, dt, A, B, C, h0, reset, states = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_last is None:
            grad_last = states.new_zeros(states[:, 0].shape)
        dx, ddt, dA, dB, dC, dh0 = torch.ops.nanollama.ssd_scan_bwd(
            x, dt, A, B, C, states, reset, grad_y, grad_last, ctx.chunk_size
        )
        return dx, ddt, dA, dB, dC, None if h0 is None else dh0.to(h0.dtype), None, None


def _ssd_chunked(x, dt, A, B, C, h0, chunk_size: int, reset):
    """The eager chunked form (ssd_scan's contract; inputs already checked)."""
    b, T, H, P = x.shape
    N = B.shape[3]
    compute = torch.promote_types(x.dtype, torch.float32)
    if T == 0:
        last = torch.zeros(b, H, P, N, dtype=x.dtype, device=x.device) if h0 is None else h0.to(x.dtype)
        return x.new_empty(x.shape), last
    L = min(chunk_size, T)
    pad = -T % L
    K = (T + pad) // L
    xf, dtf = x.to(compute), dt.to(compute)
    Bh, Ch = _heads(B, H).to(compute), _heads(C, H).to(compute)  # (B, T, H, N)
    if pad:  # dt = 0 and x = 0 past the end: decay 1, no input, so the state passes through unchanged
        xf, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bh, Ch))
        dtf = F.pad(dtf, (0, 0, 0, pad))
    log_decay = dtf * A.to(compute)  # (B, T + pad, H), <= 0
    if reset is not None:
        cut = F.pad(reset, (0, pad))[..., None]  # (B, T + pad, 1)
        log_decay = log_decay.masked_fill(cut, float("-inf"))
    X = (xf * dtf[..., None]).view(b, K, L, H, P)  # (B, K, L, H, P): the discretised input dt x
    Bc, Cc = Bh.view(b, K, L, H, N), Ch.view(b, K, L, H, N)
    Adt = log_decay.view(b, K, L, H).permute(0, 3, 1, 2)  # (B, H, K, L): log decays, <= 0 (-inf at resets)
    A_cum = torch.cumsum(Adt, dim=-1)  # (B, H, K, L)

    # 1. within each chunk: y = (C B^T o decay) X, the quadratic form
    decay = torch.exp(_segsum(Adt))  # (B, H, K, L, L): prod of decays from s+1 to l
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay  # (B, H, K, L, L)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, X)  # (B, K, L, H, P)

    # 2. each chunk's final state from a zero start
    to_end = decay[..., -1, :]  # (B, H, K, L): decay from l+1 to the chunk's end (a sum, not a difference of
    # cumsums: -inf - -inf would be nan after a reset)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, X)  # (B, K, H, P, N)

    # 3. carry states across chunks: a scan over K with the chunks' total decays
    start = torch.zeros(b, 1, H, P, N, dtype=compute, device=x.device) if h0 is None else h0.to(compute)[:, None]
    states = torch.cat((start, states), 1)  # (B, K+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (B, H, K+1, K+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (B, K+1, H, P, N)
    carried, last = states[:, :-1], states[:, -1]  # state entering each chunk; the final state

    # 4. the carried state's contribution inside each chunk
    from_start = torch.exp(A_cum)  # (B, H, K, L): decay from the chunk's start to l
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, carried, from_start)
    y = y.reshape(b, K * L, H, P)[:, :T]  # (B, T, H, P)
    return y.to(x.dtype), last.to(x.dtype)
