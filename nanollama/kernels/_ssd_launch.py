"""The SSD launcher and torch op (private to ssd.py, which imports this module so the op is registered; the
Triton kernels themselves, _ssd_triton.py, are imported at the first launch).

One route: ssd.py's _SSDScan calls torch.ops.nanollama.ssd_scan and ssd_scan_bwd, whose implementations are
`_launch_ssd` and `_launch_ssd_bwd` (fake impls for torch.compile).
"""

from __future__ import annotations

import torch

from nanollama.kernels._triton import cdiv, launch_device, pow2_at_least

__all__ = ["GPU_TILE", "MAX_CHUNK", "MAX_HEAD_DIM", "MAX_TILE", "supports"]

GPU_TILE = (64, 64, 4, 2)  # (BLOCK_P, BLOCK_N, num_warps, num_stages) on a GPU: fixed, so rounding is reproducible
BWD_BLOCK_N = 32  # the backward's N slice on a GPU: P = 64, L = 64 then fits an H200's shared memory
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


# The tiles sm90_compile_ssd.py --all checked to fit an H200 block's shared memory (227 KiB), as (chunk rows,
# head dim) padded to powers of two: (64, 64), (64, 128), (128, 64). Larger take ssd.py's eager chunked form.
MAX_CHUNK, MAX_HEAD_DIM, MAX_TILE = 128, 128, 128 * 64


def supports(L: int, P: int) -> bool:
    """Whether the kernels take chunk length L (= min(chunk_size, T)) and head dim P (same rule on every device)."""
    rows, cols = pow2_at_least(L), pow2_at_least(P)
    return rows <= MAX_CHUNK and cols <= MAX_HEAD_DIM and rows * cols <= MAX_TILE


def _blocks(L: int, P: int, N: int, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_L, BLOCK_P, BLOCK_N, num_warps, num_stages). Under the interpreter, whose cost is per operation,
    whole P and N blocks; on a GPU the fixed GPU_TILE (bounded by the sizes)."""
    block_l = max(_MIN_DOT, pow2_at_least(L))
    block_p, block_n = max(_MIN_DOT, pow2_at_least(P)), max(_MIN_DOT, pow2_at_least(N))
    if not on_gpu:
        return block_l, block_p, block_n, 1, 1
    tp, tn, warps, stages = GPU_TILE
    return block_l, min(tp, block_p), min(tn, block_n), warps, stages


def _check_kernel_side(x: torch.Tensor) -> None:
    if not x.is_cuda:
        from nanollama.kernels import _ssd_triton

        if type(_ssd_triton._ssd_state_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "the SSD Triton kernels were defined before TRITON_INTERPRET=1 was set: "
                "set it before the first Triton call (and before importing triton)"
            )


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def _reset_args(reset, x):
    """(pointer, stride_b, stride_t) for the optional (B, T) bool reset (a byte view: Triton loads it as uint8)."""
    if reset is None:
        return x, 0, 0
    r = reset.view(torch.uint8)
    return r, r.stride(0), r.stride(1)


def _launch_ssd(x, dt, A, B, C, h0, reset, chunk_size: int):
    """Chunked SSD forward; returns (y, h_last, states), new contiguous tensors.

    Shape contract (ssd.py's _check has run; names as there):
      x (B, T, H, P), fp16/bf16/fp32, any strides, T >= 1
      dt (B, T, H) and A (H,): any float dtype and strides (read as float32)
      B, C (B, T, G, N) with H % G == 0, x's dtype, any strides; head h reads group h // (H // G)
      h0 (B, H, P, N) or None (zeros), any strides
      reset (B, T) bool or None: where True the state before t (h0 included) is dropped
      chunk_size L >= 1 (any int; the kernels pad it to a power of two >= 16)
      y (B, T, H, P), h_last (B, H, P, N): x's dtype
      states (B, K, H, P, N) float32: the state entering each chunk (K = ceil(T / L)), kept for the backward
    Work: three launches (chunk states, the carry over chunks in place, the output).
    """
    _check_kernel_side(x)
    from nanollama.kernels._ssd_triton import _ssd_carry_kernel, _ssd_output_kernel, _ssd_state_kernel

    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = min(chunk_size, T)
    K = cdiv(T, L)
    block_l, block_p, block_n, warps, stages = _blocks(L, P, N, x.is_cuda)
    ieee = x.dtype == torch.float32
    y = torch.empty((b, T, H, P), dtype=x.dtype, device=x.device)
    h_last = torch.empty((b, H, P, N), dtype=x.dtype, device=x.device)
    states = torch.empty((b, K, H, P, N), dtype=torch.float32, device=x.device)
    hpg = H // G
    rst, *r_strides = _reset_args(reset, x)
    has_reset = reset is not None
    with launch_device(x):
        _ssd_state_kernel[(K, b * H, cdiv(P, block_p) * cdiv(N, block_n))](
            x, dt, A, B, states, rst, T, H, P, N, L, hpg,
            *x.stride(), *dt.stride(), *B.stride(), *states.stride(), *r_strides,
            FROM_START=False, HAS_RESET=has_reset,
            IEEE=ieee, BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        block_e = min(1024 if x.is_cuda else 4096, pow2_at_least(P * N))
        _ssd_carry_kernel[(b * H, cdiv(P * N, block_e))](
            dt, A, states, h0 if h0 is not None else x, h_last, rst, T, H, P, N, L, K,
            *dt.stride(), *r_strides, *states.stride(), *_strides(h0, 4), *h_last.stride(),
            HAS_H0=h0 is not None, REVERSE=False, HAS_RESET=has_reset,
            BLOCK_L=block_l, BLOCK=block_e, num_warps=4 if x.is_cuda else 1,
        )  # fmt: skip
        _ssd_output_kernel[(K, b * H, cdiv(P, block_p))](
            x, dt, A, B, C, states, y, rst, T, H, P, N, L, hpg,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *states.stride(), *y.stride(), *r_strides,
            HAS_RESET=has_reset,
            IEEE=ieee, BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y, h_last, states


def _launch_ssd_bwd(x, dt, A, B, C, states, reset, grad_y, grad_last, chunk_size: int):
    """Chunked SSD backward; returns (dx, ddt, dA, dB, dC, dh0) in the dtypes of x, dt, A, B, C and x.

    Shape contract: as _launch_ssd; states is its third output; grad_y (B, T, H, P) and grad_last
    (B, H, P, N), any strides. dh0 is the gradient of the initial state (also when h0 was zeros).
    Work: the output's gradient into each chunk's entering state (the state kernel, FROM_START), the
    reverse carry over chunks (the carry kernel, REVERSE), then one program per (chunk, batch x head) for
    every input's gradient; per-head dB and dC are summed over each group's heads here.
    """
    _check_kernel_side(x)
    from nanollama.kernels._ssd_triton import _ssd_bwd_kernel, _ssd_carry_kernel, _ssd_state_kernel

    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = min(chunk_size, T)
    K = cdiv(T, L)
    block_l, block_p, block_n, warps, stages = _blocks(L, P, N, x.is_cuda)
    ieee = x.dtype == torch.float32
    hpg = H // G
    dev = x.device
    dstates = torch.empty((b, K, H, P, N), dtype=torch.float32, device=dev)
    dh0 = torch.empty((b, H, P, N), dtype=torch.float32, device=dev)
    dx = torch.empty((b, T, H, P), dtype=x.dtype, device=dev)
    ddt = torch.empty((b, T, H), dtype=torch.float32, device=dev)
    dB = torch.empty((b, T, H, N), dtype=torch.float32, device=dev)  # per head: summed over groups below
    dC = torch.empty_like(dB)
    dA = torch.empty((b * H, K), dtype=torch.float32, device=dev)
    rst, *r_strides = _reset_args(reset, x)
    has_reset = reset is not None
    with launch_device(x):
        _ssd_state_kernel[(K, b * H, cdiv(P, block_p) * cdiv(N, block_n))](
            grad_y, dt, A, C, dstates, rst, T, H, P, N, L, hpg,
            *grad_y.stride(), *dt.stride(), *C.stride(), *dstates.stride(), *r_strides,
            FROM_START=True, HAS_RESET=has_reset,
            IEEE=ieee, BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        block_e = min(1024 if x.is_cuda else 4096, pow2_at_least(P * N))
        _ssd_carry_kernel[(b * H, cdiv(P * N, block_e))](
            dt, A, dstates, grad_last, dh0, rst, T, H, P, N, L, K,
            *dt.stride(), *r_strides, *dstates.stride(), *grad_last.stride(), *dh0.stride(),
            HAS_H0=True, REVERSE=True, HAS_RESET=has_reset,
            BLOCK_L=block_l, BLOCK=block_e, num_warps=4 if x.is_cuda else 1,
        )  # fmt: skip
        # one program holds all of P (the log-decay gradient sums over P and N), N in slices
        full_p = max(_MIN_DOT, pow2_at_least(P))
        slice_n = min(BWD_BLOCK_N, block_n) if x.is_cuda else block_n
        _ssd_bwd_kernel[(K, b * H)](
            x, dt, A, B, C, grad_y, states, dstates, dx, ddt, dB, dC, dA, rst, T, H, P, N, L, K, hpg,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *grad_y.stride(), *states.stride(), *r_strides,
            HAS_RESET=has_reset,
            IEEE=ieee, BLOCK_L=block_l, BLOCK_P=full_p, BLOCK_N=slice_n, num_warps=8 if x.is_cuda else 1,
            num_stages=1,
        )  # fmt: skip
    dB = dB.view(b, T, G, hpg, N).sum(3)  # (B, T, G, N): a group's gradient is its heads' sum
    dC = dC.view(b, T, G, hpg, N).sum(3)
    dA = dA.view(b, H, K).sum((0, 2))  # (H,)
    return dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dh0.to(x.dtype)


# ----------------------------------------------------------------------------- torch op
#
# One route, eager and traced: _SSDScan -> this op (Triton forward); its backward is ssd.py's.


@torch.library.custom_op(
    "nanollama::ssd_scan",
    mutates_args=(),
    schema="(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? h0, Tensor? reset, int chunk_size) "
    "-> (Tensor, Tensor, Tensor)",
)
def _ssd_scan_op(x, dt, A, B, C, h0, reset, chunk_size):
    return _launch_ssd(x, dt, A, B, C, h0, reset, chunk_size)


@_ssd_scan_op.register_fake
def _ssd_scan_fake(x, dt, A, B, C, h0, reset, chunk_size):
    b, T, H, P = x.shape
    N = B.shape[3]
    K = cdiv(T, min(chunk_size, T))
    states = x.new_empty((b, K, H, P, N), dtype=torch.float32)
    return x.new_empty((b, T, H, P)), x.new_empty((b, H, P, N)), states


@torch.library.custom_op(
    "nanollama::ssd_scan_bwd",
    mutates_args=(),
    schema="(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor states, Tensor? reset, Tensor grad_y, "
    "Tensor grad_last, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _ssd_scan_bwd_op(x, dt, A, B, C, states, reset, grad_y, grad_last, chunk_size):
    return _launch_ssd_bwd(x, dt, A, B, C, states, reset, grad_y, grad_last, chunk_size)


@_ssd_scan_bwd_op.register_fake
def _ssd_scan_bwd_fake(x, dt, A, B, C, states, reset, grad_y, grad_last, chunk_size):
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), x.new_empty(grad_last.shape))  # fmt: skip
