"""Whole-model batched generation: tokens/s of the KV-cached paths against naive recomputation.

One batch of B prompts of ragged lengths, N new tokens each (no stop tokens, so B * N tokens per
call); tokens/s = B * N / median time of one generate() call, prefill included.

Variants (one group per shape):
  [cache-compile]  KV cache, decode step under torch.compile (inductor, CUDA graphs via
                   mode="reduce-overhead"), Triton decode_attention and RoPE. GPU only: inductor
                   needs about a minute to compile the step on 2 CPU cores.
  [cache]          KV cache, eager Python loop, default kernel dispatch (Triton on a GPU).
  [eager-cache]    KV cache, eager, NANOLLAMA_KERNELS=reference: decode_attention_ref over the
                   padded cache and the eager RoPE, i.e. plain PyTorch. On the CPU this is what
                   [cache] runs already, so it is skipped there.
  [recompute]      no cache: every step reruns the whole batch (prompt + tokens so far) through the model.

Timing: whole generate() calls (it ends by reading the tokens back, so the device is synchronised),
one untimed warm-up call (compilation, CUDA graph capture), then `ROUNDS` timed calls. The
harness's `measure` is not used: it rotates input sets to defeat the L2 cache, which means tens of
whole generations per round here, while the model's weights alone exceed the L2 anyway.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, device_name, requires_gpu

from nanollama.generate import generate
from nanollama.models.transformer import Transformer, TransformerConfig

if DEVICE.type == "cuda":
    MODEL = dict(vocab_size=8192, dim=768, n_layers=6, n_heads=12, n_kv_heads=4, max_seq_len=2048)
    DTYPE = torch.bfloat16
    CASES = [(1, (512,), 128), (16, (32, 1024), 128), (64, (32, 512), 64)]  # (B, prompt length range, N)
    ROUNDS = 3
else:
    MODEL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512)
    DTYPE = torch.float32
    # Prompts long enough that recomputing them is not hidden under the per-step Python overhead.
    CASES = [(1, (256,), 32), (8, (16, 256), 32)]
    ROUNDS = 3

VARIANTS = ["cache-compile", "cache", "eager-cache", "recompute"]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**MODEL)).to(device=DEVICE, dtype=DTYPE).eval()


def _prompts(B: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(B)
    low, high = (lengths[0], lengths[0]) if len(lengths) == 1 else lengths
    sizes = torch.randint(low, high + 1, (B,), generator=g).tolist()
    return [torch.randint(0, MODEL["vocab_size"], (n,), generator=g).tolist() for n in sizes]


def _case_id(case) -> str:
    B, lengths, n = case
    return f"B{B}-P{'-'.join(map(str, lengths))}-N{n}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_generate(benchmark, model, case, variant, monkeypatch):
    """tokens/s = B * N / time of one generate() call (prefill + N - 1 decode steps + sampling)."""
    if variant == "cache-compile":
        requires_gpu("compiled generation (inductor on 2 CPU cores takes a minute to compile)")
    if variant == "eager-cache" and DEVICE.type != "cuda":
        pytest.skip("on the CPU [cache] already dispatches to the eager reference kernels")
    if variant == "eager-cache":
        monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    B, lengths, n = case
    benchmark.group = f"generate-{_case_id(case)}"
    prompts = _prompts(B, lengths)
    kwargs = dict(compile=variant == "cache-compile", recompute=variant == "recompute")

    def call():
        return generate(model, prompts, n, **kwargs)

    out = call()  # warm-up: compile and CUDA graph capture happen here, untimed
    assert [len(r) for r in out] == [n] * B
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=device_name(),
        dtype=str(DTYPE).removeprefix("torch."),
        model=MODEL,
        batch=B,
        prompt_lengths=[len(p) for p in prompts],
        new_tokens=n,
        median_s=seconds,
        tokens_per_s=round(B * n / seconds, 1),
        ms_per_step=round(1e3 * seconds / n, 3),
        variant=variant,
    )
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
