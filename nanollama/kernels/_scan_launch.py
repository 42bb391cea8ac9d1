"""The linear-scan launchers and torch ops (private to scan.py, which imports this module so the ops are
registered; the Triton kernels themselves, _scan_triton.py, are imported at the first launch).

One route: scan.py's _LinearScan / _LogScan call torch.ops.nanollama.linear_scan and linear_scan_bwd,
whose implementations are `_launch_scan` and `_launch_scan_bwd` (fake impls for torch.compile).
"""

from __future__ import annotations

import functools

import torch

from nanollama.kernels._triton import cdiv, launch_device, pow2_at_least

__all__ = ["GPU_TILE"]

# ----------------------------------------------------------------------------- launcher


GPU_TILE = (64, 32, 4, 1)  # (BLOCK_T, BLOCK_C, num_warps, num_stages); bench_scan's test_scan_tiles sweeps others


def _blocks(T: int, C: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps, num_stages). On a GPU, 32 channels (128 contiguous bytes of fp32 per
    row) keep B * C / 32 programs in flight, each streaming 64-row chunks: a fixed tile, not autotuned, so
    the rounding (the scan's association order) is the same on every run and resume. Under the
    interpreter, whose cost is per operation, whole blocks as large as the input allows."""
    if on_gpu:
        block_t, block_c, warps, stages = GPU_TILE
        return min(block_t, pow2_at_least(T)), min(block_c, pow2_at_least(C)), warps, stages
    return min(256, pow2_at_least(T)), min(128, pow2_at_least(C)), 1, 1


def _check_kernel_side(a: torch.Tensor) -> None:
    if not a.is_cuda:
        from nanollama.kernels import _scan_triton

        # decorated while TRITON_INTERPRET was off
        if type(_scan_triton._scan_fwd_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "the scan Triton kernel was defined before TRITON_INTERPRET=1 was set: "
                "set it before the first Triton call (and before importing triton)"
            )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _segments(B: int, T: int, C: int, block_t: int, block_c: int, a: torch.Tensor) -> int:
    """How many sequence segments run in parallel: 1, unless B * C leaves the GPU under 2 programs per SM
    (a small model, e.g. 8 x 512 channels: 128 programs on 132 SMs), then about 4 per SM, each segment
    >= 4 chunks long. Splitting costs one more read of the inputs (a first pass finds each segment's
    product and final state), so the issue's (8, 4096, 1536), 384 programs, runs unsplit."""
    if not a.is_cuda:
        return 1
    programs, sms = B * cdiv(C, block_c), _sm_count(a.get_device())
    if programs >= 2 * sms:
        return 1
    return max(1, min(cdiv(4 * sms, programs), T // (4 * block_t)))


def _seg_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(b, segment, c) strides of a per-segment (B, S, C) tensor, or of a (B, C) one shared by all segments."""
    if t is None:
        return 0, 0, 0
    return tuple(t.stride()) if t.dim() == 3 else (t.stride(0), 0, t.stride(1))


def _fwd(a, b, h0, h, h_last, prod, seg: int, n_seg: int, log: bool, write_h: bool, blocks) -> None:
    from nanollama.kernels._scan_triton import _scan_fwd_kernel

    block_t, block_c, warps, stages = blocks
    B, T, C = a.shape
    _scan_fwd_kernel[(B, cdiv(C, block_c), n_seg)](
        a, b, h0 if h0 is not None else a, h, h_last, prod if prod is not None else a,
        T, C, seg, *a.stride(), *b.stride(), *_seg_strides(h0), *h.stride(), *_seg_strides(h_last),
        *_seg_strides(prod),
        HAS_H0=h0 is not None, LOG=log, WRITE_H=write_h, WRITE_PROD=prod is not None,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _launch_scan(a, b, h0, log: bool):
    """Forward scan; returns (h, h_last), new contiguous tensors.

    Shape contract:
      a, b (B, T, C): any strides, one float dtype (fp16/bf16/fp32); T >= 1
      h0 (B, C) of a's dtype, any strides, or None (h0 = 0; log: log h0 = -inf)
      log: a, b, h0 are log a, log b, log h0 and h is log h (then h and h_last are float32)
      h (B, T, C), h_last (B, C): a's dtype (float32 when log)
    linear_scan checks shapes first (_check). With S > 1 segments (_segments): a pass for each segment's
    (product, final state) from zero, the carry scan over the S segments, then the scan from those states.
    """
    _check_kernel_side(a)
    B, T, C = a.shape
    out_dtype = torch.float32 if log else a.dtype
    h = torch.empty((B, T, C), dtype=out_dtype, device=a.device)
    h_last = torch.empty((B, C), dtype=out_dtype, device=a.device)
    blocks = _blocks(T, C, a.is_cuda)
    n_seg = _segments(B, T, C, blocks[0], blocks[1], a)
    seg = cdiv(cdiv(T, n_seg), blocks[0]) * blocks[0]  # a whole number of chunks
    n_seg = cdiv(T, seg)
    with launch_device(a):
        if n_seg == 1:
            _fwd(a, b, h0, h, h_last, None, T, 1, log, True, blocks)
            return h, h_last
        seg_last = torch.empty((B, n_seg, C), dtype=torch.float32, device=a.device)
        seg_prod = torch.empty_like(seg_last)
        _fwd(a, b, None, h, seg_last, seg_prod, seg, n_seg, log, False, blocks)
        ends = torch.empty_like(seg_last)  # (B, S, C): the state at each segment's end
        _fwd(seg_prod, seg_last, h0, ends, h_last, None, n_seg, 1, log, True, _blocks(n_seg, C, True))
        if h0 is None:
            first = torch.full((B, 1, C), float("-inf") if log else 0.0, device=a.device)
        else:
            first = h0.float()[:, None]
        starts = torch.cat((first, ends[:, :-1]), 1)  # (B, S, C): the state entering each segment
        _fwd(a, b, starts, h, seg_last, None, seg, n_seg, log, True, blocks)
    return h, h_last


def _bwd(a, h, h0, g, g_last, grad_a, grad_b, dh0, prod, seg: int, n_seg: int, write: bool, blocks) -> None:
    from nanollama.kernels._scan_triton import _scan_bwd_kernel

    block_t, block_c, warps, stages = blocks
    B, T, C = a.shape
    h0_strides = h0.stride() if h0 is not None else (0, 0)
    _scan_bwd_kernel[(B, cdiv(C, block_c), n_seg)](
        a, h, h0 if h0 is not None else a, g, g_last, grad_a, grad_b, dh0, prod if prod is not None else a,
        T, C, seg, *a.stride(), *h.stride(), *h0_strides, *g.stride(), *_seg_strides(g_last),
        *grad_a.stride(), *grad_b.stride(), *_seg_strides(dh0), *_seg_strides(prod),
        HAS_H0=h0 is not None, WRITE_GRADS=write, WRITE_PROD=prod is not None,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _launch_scan_bwd(a, h, h0, grad_h, grad_last):
    """Reverse scan; returns (grad_a, grad_b, grad_h0), new contiguous tensors of a's dtype.

    Shape contract: a, h, grad_h (B, T, C), any strides, T >= 1; h0 None or (B, C); grad_last (B, C).
    grad_h0 = a_0 * dh_0 (the gradient of a zero initial state when h0 is None). Segments as forward,
    the carry scan running from the last segment.
    """
    _check_kernel_side(a)
    B, T, C = a.shape
    grad_a = torch.empty((B, T, C), dtype=a.dtype, device=a.device)
    grad_b = torch.empty((B, T, C), dtype=a.dtype, device=a.device)
    grad_h0 = torch.empty((B, C), dtype=a.dtype, device=a.device)
    blocks = _blocks(T, C, a.is_cuda)
    n_seg = _segments(B, T, C, blocks[0], blocks[1], a)
    seg = cdiv(cdiv(T, n_seg), blocks[0]) * blocks[0]
    n_seg = cdiv(T, seg)
    with launch_device(a):
        if n_seg == 1:
            _bwd(a, h, h0, grad_h, grad_last, grad_a, grad_b, grad_h0, None, T, 1, True, blocks)
            return grad_a, grad_b, grad_h0
        local = torch.empty((B, n_seg, C), dtype=torch.float32, device=a.device)  # dh at each start, from 0
        prod = torch.empty_like(local)
        zeros = torch.zeros((B, C), dtype=torch.float32, device=a.device)
        _bwd(a, h, h0, grad_h, zeros, grad_a, grad_b, local, prod, seg, n_seg, False, blocks)
        # D_s = local_s + prod_s D_{s+1}, D_S = grad_last: a forward scan over the reversed segments
        rev, rev_last = prod.flip(1), torch.empty_like(zeros)
        starts = torch.empty_like(local)
        tail = grad_last.float()
        _fwd(rev, local.flip(1), tail, starts, rev_last, None, n_seg, 1, False, True, _blocks(n_seg, C, True))
        after = torch.cat((starts.flip(1)[:, 1:], tail[:, None]), 1)  # (B, S, C): dh entering each from its end
        dh0 = torch.empty((B, n_seg, C), dtype=a.dtype, device=a.device)
        _bwd(a, h, h0, grad_h, after, grad_a, grad_b, dh0, None, seg, n_seg, True, blocks)
    return grad_a, grad_b, dh0[:, 0].contiguous()


# ----------------------------------------------------------------------------- torch ops
#
# One route, eager and traced: _LinearScan / _LogScan -> these ops (Triton) or the eager chunked scan.


@torch.library.custom_op(
    "nanollama::linear_scan", mutates_args=(), schema="(Tensor a, Tensor b, Tensor? h0, bool log) -> (Tensor, Tensor)"
)
def _linear_scan_op(a, b, h0, log):
    return _launch_scan(a, b, h0, log)


@_linear_scan_op.register_fake
def _linear_scan_fake(a, b, h0, log):
    dtype = torch.float32 if log else a.dtype
    B, T, C = a.shape
    return a.new_empty((B, T, C), dtype=dtype), a.new_empty((B, C), dtype=dtype)


@torch.library.custom_op(
    "nanollama::linear_scan_bwd",
    mutates_args=(),
    schema="(Tensor a, Tensor h, Tensor? h0, Tensor grad_h, Tensor grad_last) -> (Tensor, Tensor, Tensor)",
)
def _linear_scan_bwd_op(a, h, h0, grad_h, grad_last):
    return _launch_scan_bwd(a, h, h0, grad_h, grad_last)


@_linear_scan_bwd_op.register_fake
def _linear_scan_bwd_fake(a, h, h0, grad_h, grad_last):
    B, T, C = a.shape
    return a.new_empty((B, T, C)), a.new_empty((B, T, C)), a.new_empty((B, C))
