"""KV-cache decode attention: one new query token per sequence against a ragged, preallocated cache.

Flash-decoding in two Triton kernels. `_decode_split_kernel` gives each (sequence, KV head, split of
the cache) its own program: it reads that split of K and V once for all the query heads of the GQA
group and writes a partial output, normalised within the split, with its log-sum-exp. Programs whose
split starts at or after the sequence's length exit at once, so the work (and the bytes read) is
proportional to the sum of the lengths, not to B x S_max. `_decode_reduce_kernel` then merges the
partials of each (sequence, query head) with their log-sum-exps.

Decode is inference-only: there is no backward.

Host cost. decode_attention checks its inputs once and, on the Triton path, always goes through the
`nanollama::decode_attention` torch op (one route, eager and traced). The split arithmetic is cached
per shape. Host time per call with no-op kernels (bench/host_cost.py: B1 Hq32 Hk8 S8K D128, 2
shared CPU cores, best of 5 runs): ~20 us with the former direct eager launch, ~58 us through
the op, against GPU floors of ~8-60 us at the benchmark shapes on an H200. generate() with
compile=True on CUDA replays the whole step as a CUDA graph, which removes the host cost altogether.
"""

from __future__ import annotations

import functools
import math

import torch

from nanollama.kernels._triton import cdiv as _cdiv
from nanollama.kernels._triton import launch_device
from nanollama.kernels._triton import pow2_at_least as _next_pow2
from nanollama.kernels.dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Input checks, shared by the launcher and the public function
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: the reference only


def _check_lengths(cache_seqlens: torch.Tensor, s_max: int) -> None:
    """A ValueError for lengths outside [0, S_max] (a host sync: the reference path only; not while tracing)."""
    if torch.compiler.is_compiling() or not cache_seqlens.numel():
        return
    low, high = torch.aminmax(cache_seqlens)
    if low < 0 or high > s_max:
        raise ValueError(
            f"decode_attention: cache_seqlens must lie in [0, S_max = {s_max}], got values in [{int(low)}, {int(high)}]"
        )


def _check_inputs(q, k_cache, v_cache, cache_seqlens, split_size=None) -> None:
    """Raise a one-line ValueError naming the argument when shapes, dtypes or devices disagree."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"decode_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be (B, Hq, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"decode_attention: k_cache must be (B, Hk, S_max, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}"
        )
    B, Hq, D = q.shape
    Bk, Hk, _, Dk = k_cache.shape
    if Bk != B:
        raise ValueError(f"decode_attention: k_cache batch {Bk} must equal q batch {B}")
    if Dk != D:
        raise ValueError(f"decode_attention: k_cache head dim {Dk} must equal q head dim {D}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"decode_attention: q heads {Hq} must be a multiple of k_cache heads {Hk}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"decode_attention: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"decode_attention: q dtype must be one of {_DTYPES}, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"decode_attention: k_cache/v_cache dtype ({k_cache.dtype}, {v_cache.dtype}) must equal q dtype {q.dtype}"
        )
    device = q.device  # compared one by one: cheaper than building a set on every call
    if k_cache.device != device or v_cache.device != device or cache_seqlens.device != device:
        devices = {t.device for t in (q, k_cache, v_cache, cache_seqlens)}
        raise ValueError(f"decode_attention: q, k_cache, v_cache, cache_seqlens must share one device, got {devices}")
    if split_size is not None and (split_size <= 0 or split_size % 16):
        raise ValueError(f"decode_attention: split_size must be a positive multiple of 16, got {split_size}")


# ----------------------------------------------------------------------------------------------
# Launcher (the one launch site)
# ----------------------------------------------------------------------------------------------


# Launch configuration. Not yet tuned on a GPU: `python bench/bench_decode.py` on one sweeps these
# (num_stages 2 gives cp.async double buffering of K/V on sm_90 at 38 KB of shared memory per program).
TUNING = {"num_warps": 4, "num_stages": 2, "programs_per_sm": 4, "min_split": 256, "max_split": 1024}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_LOG2E = math.log2(math.e)


def _block_n(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def _pick_split_size(B: int, Hk: int, S_max: int, block_n: int, sms: int, programs_per_sm: int, min_split: int,
                     max_split: int) -> int:  # fmt: skip
    """Keys per split, from the shapes only (reading the lengths would sync the host and break CUDA graphs).

    Enough splits to give the device ~programs_per_sm programs per SM (`sms` of them) when the cache
    is full; splits of at most max_split keys, so a ragged batch's long sequences spread over many
    programs instead of a few long ones finishing last; and at least min_split keys, so the partial
    outputs (G x D floats per split and head group, written and read back) stay a few percent of
    the K/V bytes read.
    """
    n_splits = max(_cdiv(programs_per_sm * sms, B * Hk), _cdiv(S_max, max_split))
    n_splits = max(1, min(n_splits, _cdiv(S_max, min_split)))
    return max(block_n, _cdiv(_cdiv(S_max, n_splits), block_n) * block_n)


@functools.lru_cache(maxsize=256)
def _plan(B: int, Hq: int, Hk: int, S_max: int, D: int, split_size: int, sms: int, tuning: tuple) -> tuple:
    """(split_size, n_splits, BLOCK_N, BLOCK_D, BLOCK_G, BLOCK_S) for one launch; split_size 0: pick it.

    Cached, keyed by ints (tuning: TUNING's values, so a sweep that edits TUNING gets fresh plans):
    a hit costs ~0.4 us here against ~3.5 us for the arithmetic below.
    """
    block_n = _block_n(D)
    if split_size == 0:
        _, _, programs_per_sm, min_split, max_split = tuning
        split_size = _pick_split_size(B, Hk, S_max, block_n, sms, programs_per_sm, min_split, max_split)
    else:
        block_n = min(block_n, split_size & -split_size)  # a power of two dividing split_size, >= 16
    n_splits = _cdiv(S_max, split_size)
    block_d = max(16, _next_pow2(D))
    return split_size, n_splits, block_n, block_d, max(16, _next_pow2(Hq // Hk)), min(32, _next_pow2(n_splits))


def decode_attention_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    split_size: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Run the two Triton kernels. Returns out (B, Hq, D) in q's dtype.

    q (B, Hq, D); k_cache, v_cache (B, Hk, S_max, D) with Hq % Hk == 0; cache_seqlens (B,) int32 or
    int64: sequence b attends to cache positions [0, cache_seqlens[b]), clamped to S_max; length 0
    gives zeros. Any strides (views into a bigger cache are fine); q, k_cache, v_cache share a dtype
    in {float16, bfloat16, float32}. split_size: keys per split, a positive multiple of 16 (None:
    chosen from the shapes and the device). check=False skips the input checks, for a caller that
    has just made them (decode_attention: checking once per call is part of its host budget).
    Workspace: o_part (B, Hq, n_splits, D) float32 and lse (B, Hq, n_splits) float32, base 2.
    """
    if check:
        _check_inputs(q, k_cache, v_cache, cache_seqlens, split_size)
    sms = _sm_count(q.get_device()) if q.is_cuda else 8  # the interpreter: any SM count
    with launch_device(q):
        return _launch(q, k_cache, v_cache, cache_seqlens, scale, split_size, sms)


def _launch(q, k_cache, v_cache, cache_seqlens, scale: float, split_size: int | None, sms: int) -> torch.Tensor:
    B, Hq, D = q.shape
    _, Hk, S_max, _ = k_cache.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, Hq, D), cheaper than new_empty
    if B == 0 or Hq == 0 or S_max == 0:
        return out.zero_()
    tuning = TUNING
    split_size, n_splits, block_n, block_d, block_g, block_s = _plan(
        B, Hq, Hk, S_max, D, split_size or 0, sms,
        (tuning["num_warps"], tuning["num_stages"], tuning["programs_per_sm"], tuning["min_split"],
         tuning["max_split"]),
    )  # fmt: skip
    o_part = torch.empty((B, Hq, n_splits, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, Hq, n_splits), device=q.device, dtype=torch.float32)
    # fp32 inputs get a true fp32 dot (no TF32) so they meet fp32 tolerances.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    from nanollama.kernels._decode_triton import _decode_reduce_kernel, _decode_split_kernel  # see its docstring

    _decode_split_kernel[(B * Hk, n_splits)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), cache_seqlens.stride(0),
        *o_part.stride(), *lse.stride(),
        scale * _LOG2E, S_max, split_size,
        HK=Hk, GROUP=Hq // Hk, HEAD_DIM=D, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=precision, num_warps=tuning["num_warps"], num_stages=tuning["num_stages"],
    )  # fmt: skip
    _decode_reduce_kernel[(B * Hq,)](
        o_part, lse, cache_seqlens, out,
        *o_part.stride(), *lse.stride(), cache_seqlens.stride(0), *out.stride(),
        S_max, split_size,
        HQ=Hq, HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Public op and its eager reference
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("nanollama::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    split_size: int,
) -> torch.Tensor:
    # decode_attention has checked the inputs: the op is its one route, not a public entry
    return decode_attention_launch(q, k_cache, v_cache, cache_seqlens, scale, split_size or None, False)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, split_size):
    return q.new_empty(q.shape)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Eager decode attention, math in float32 (float64 for float64 inputs); same contract as decode_attention.

    Masks by value, so slots at or after a sequence's length may hold NaN; a length of 0 gives zeros,
    a NaN in q or in a visible slot gives NaN. Lengths outside [0, S_max] are a ValueError (one host
    sync on a GPU; not checked under torch.compile).
    Costs B x S_max whatever the lengths: it is the baseline, not the fast path.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens)
    _check_lengths(cache_seqlens, k_cache.shape[2])
    B, Hq, D = q.shape
    Hk, S_max = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    valid = torch.arange(S_max, device=q.device)[None, :] < cache_seqlens[:, None]  # (B, S_max)
    k = k_cache.to(compute)
    v = v_cache.to(compute).masked_fill(~valid[:, None, :, None], 0.0)  # NaN * 0 would poison the output
    qg = q.to(compute).reshape(B, Hk, Hq // Hk, D)  # (B, Hk, G, D): GQA by grouping, no K/V copy
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale  # (B, Hk, G, S_max)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, Hk, G, S_max); an empty sequence's row is all NaN
    probs = probs.masked_fill((cache_seqlens <= 0)[:, None, None, None], 0.0)  # -> zeros; other NaNs stay
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v)  # (B, Hk, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    *,
    split_size: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its KV cache. Inference only: no backward.

    q (B, Hq, D); k_cache, v_cache (B, Hk, S_max, D), Hq a multiple of Hk (GQA, K/V never copied);
    cache_seqlens (B,) int32 or int64: sequence b sees cache positions [0, cache_seqlens[b]); slots at
    or after that are never read (they may hold NaN). Returns (B, Hq, D) in q's dtype. scale defaults
    to 1/sqrt(D). split_size (keys per program, multiple of 16) is a tuning knob; None picks it.
    A length of 0 gives zeros; a NaN in q or in a visible slot gives NaN, as on every backend.
    Lengths outside [0, S_max]: a ValueError on the reference path; the Triton path does not check
    (that would synchronise the host every step) and clamps them, so a length past S_max reads the
    whole cache and a negative one gives zeros.
    Dispatch: Triton on CUDA tensors (or NANOLLAMA_KERNELS=triton), else decode_attention_ref; float64
    always takes the reference.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, split_size)  # the one check of the call
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if use_triton(q, k_cache, v_cache, cache_seqlens):
        return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, scale, split_size or 0)
    return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale)
