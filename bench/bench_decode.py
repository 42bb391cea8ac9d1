"""Decode attention: the split-K Triton kernel against eager SDPA over the padded cache, and the reference.

One new token per sequence, q (B, Hq, 1, D) against caches (B, Hk, S_max, D) whose sequences hold
L_b <= S_max valid positions. Bytes counted = the K/V a decode step needs, whatever the variant:
2 * sum_b(L_b) * Hk * D * element size (q and the output are negligible). So for eager, which reads
all of B x S_max, GB/s is an effective rate and the gap to Triton on ragged batches shows the saving.

Length patterns: "full" (every L_b = S_max), "ragged" (L_b uniform in [1, S_max], fixed seed) and
"skew" (one sequence at S_max, the others at S_max / 64: continuous batching with one long request).
GPU: Hq=32, Hk=8, D=128 bf16, contexts 1K..32K, batch 1..64. CPU: small fp32 shapes, Triton skipped
(the interpreter is not a performance path).

Variants: triton (decode_attention launched eagerly: ~20 us of host time per call included, as much
as the whole GPU time of the small cases), triton-graph (the same call captured once per input set
into a CUDA graph, outside the timing, and replayed: the kernel-bound figure, and what generate(compile=True)
runs on CUDA, whose decode step replays CUDA graphs; GPU only), eager (SDPA over the padded cache), ref.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, graphed_inputs, measure, replay_graph, requires_gpu

from nanollama.kernels.decode import decode_attention, decode_attention_ref

if DEVICE.type == "cuda":
    HQ, HK, D, DTYPE = 32, 8, 128, torch.bfloat16
    # (B, S_max, pattern)
    CASES = [
        (1, 1024, "full"),
        (1, 8192, "full"),
        (1, 32768, "full"),
        (8, 8192, "full"),
        (8, 8192, "ragged"),
        (64, 1024, "ragged"),
        (64, 8192, "full"),
        (64, 8192, "ragged"),
        (64, 8192, "skew"),
        (16, 32768, "ragged"),
        (32, 32768, "skew"),  # eager SDPA (math path, K/V expanded for GQA) stays well inside memory
    ]
    REF_MAX_BYTES = 2 << 30  # the reference copies the cache to fp32: only time it on small caches
else:
    HQ, HK, D, DTYPE = 8, 2, 64, torch.float32
    CASES = [(1, 1024, "full"), (4, 1024, "ragged"), (8, 512, "skew")]
    REF_MAX_BYTES = 1 << 40

VARIANTS = ["triton", "triton-graph", "eager", "ref"]


def _lengths(B: int, S_max: int, pattern: str) -> torch.Tensor:
    if pattern == "full":
        lengths = torch.full((B,), S_max)
    elif pattern == "ragged":
        lengths = torch.randint(1, S_max + 1, (B,), generator=torch.Generator().manual_seed(B * S_max))
    elif pattern == "skew":
        lengths = torch.full((B,), max(1, S_max // 64))
        lengths[0] = S_max
    else:
        raise ValueError(f"unknown length pattern {pattern!r}")
    return lengths.to(torch.int32)


def _sdpa_padded(q, k_cache, v_cache, cache_seqlens):
    """What a plain PyTorch decode step does: SDPA over the whole padded cache with a length mask."""
    S_max = k_cache.shape[2]
    mask = torch.arange(S_max, device=q.device)[None, :] < cache_seqlens[:, None]  # (B, S_max)
    out = F.scaled_dot_product_attention(
        q[:, :, None], k_cache, v_cache, attn_mask=mask[:, None, None, :], enable_gqa=q.shape[1] != k_cache.shape[1]
    )  # (B, Hq, 1, D)
    return out[:, :, 0]


def _op(variant: str):
    if variant in ("triton", "triton-graph"):
        requires_gpu()
        return decode_attention
    return _sdpa_padded if variant == "eager" else decode_attention_ref


def _case_id(case) -> str:
    B, S_max, pattern = case
    return f"B{B}-S{S_max // 1024}K-{pattern}" if S_max >= 1024 else f"B{B}-S{S_max}-{pattern}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_attention(benchmark, case, variant, monkeypatch):
    """GB/s = 2 * sum(L_b) * Hk * D * element size / time (only the K/V bytes a decode step needs)."""
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton" if variant.startswith("triton") else "auto")
    op = _op(variant)
    B, S_max, pattern = case
    benchmark.group = f"decode-{_case_id(case)}"
    lengths = _lengths(B, S_max, pattern)
    cache_bytes = 2 * B * HK * S_max * D * DTYPE.itemsize
    if variant == "ref" and cache_bytes > REF_MAX_BYTES:
        pytest.skip(f"reference not timed on a {cache_bytes / 2**30:.1f} GiB cache (fp32 copies)")

    def make():
        # Random everywhere (eager SDPA would turn NaN padding into NaN output; the kernel never reads it).
        q = torch.randn(B, HQ, D, device=DEVICE, dtype=DTYPE)
        k = torch.randn(B, HK, S_max, D, device=DEVICE, dtype=DTYPE)
        v = torch.randn(B, HK, S_max, D, device=DEVICE, dtype=DTYPE)
        return q, k, v, lengths.to(DEVICE)

    needed = 2 * int(lengths.sum()) * HK * D * DTYPE.itemsize
    fn, sets = (replay_graph, graphed_inputs(op, make)) if variant == "triton-graph" else (op, make)
    with torch.no_grad():
        measure(
            benchmark,
            fn,
            sets,
            bytes=needed,
            dtype=DTYPE,
            shapes={"q": (B, HQ, D), "cache": (B, HK, S_max, D)},
            variant=variant,
            pattern=pattern,
            sum_lengths=int(lengths.sum()),
            padded_bytes=cache_bytes,
        )


def sweep() -> None:
    """GPU only: GB/s of the Triton kernel for each launch configuration in decode.TUNING's neighbourhood.

    `PYTHONPATH=. python bench/bench_decode.py` prints one line per (case, config), best per case last.
    """
    import functools
    import itertools

    import triton.testing

    from nanollama.kernels import decode as decode_mod

    if DEVICE.type != "cuda":
        raise SystemExit("the sweep times the Triton kernel: it needs a CUDA device")
    default = dict(decode_mod.TUNING)
    grid = {"num_warps": [4, 8], "num_stages": [1, 2, 3], "max_split": [512, 1024, 2048]}
    for case in [(1, 8192, "full"), (8, 32768, "full"), (64, 8192, "ragged"), (32, 32768, "skew")]:
        B, S_max, pattern = case
        lengths = _lengths(B, S_max, pattern).to(DEVICE)
        q = torch.randn(B, HQ, D, device=DEVICE, dtype=DTYPE)
        k = torch.randn(B, HK, S_max, D, device=DEVICE, dtype=DTYPE)
        v = torch.randn(B, HK, S_max, D, device=DEVICE, dtype=DTYPE)
        needed = 2 * int(lengths.sum()) * HK * D * DTYPE.itemsize
        results = []
        for values in itertools.product(*grid.values()):
            decode_mod.TUNING.update(dict(zip(grid, values)))
            call = functools.partial(decode_attention, q, k, v, lengths)
            ms = triton.testing.do_bench(call, warmup=25, rep=100)
            results.append((needed / ms / 1e6, dict(zip(grid, values)), ms))
            print(f"{_case_id(case):18s} {results[-1][1]} {ms * 1e3:9.1f} us {results[-1][0]:8.1f} GB/s", flush=True)
        decode_mod.TUNING.clear()
        decode_mod.TUNING.update(default)
        best = max(results, key=lambda r: r[0])
        print(f"BEST {_case_id(case):18s} {best[1]} {best[2] * 1e3:9.1f} us {best[0]:8.1f} GB/s", flush=True)


if __name__ == "__main__":
    sweep()
