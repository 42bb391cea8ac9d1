"""Linear scan and Mamba-2's SSD: the Triton scan against the eager parallel scan and torch.compile of it;
at long T, the chunked SSD against causal attention (SDPA) at the same width.

Scan bytes (h_t = a_t h_{t-1} + b_t on (B, T, C), element size e): forward reads a and b and writes h,
3 B T C e; the backward reads a, h and dh and writes da and db, 5 B T C e; forward+backward 8 B T C e.
The scan is memory-bound: GB/s and the fraction of HBM peak are the figures (issue 17: >= 70% at T >= 4K).
Anchor: accelerated-scan's Triton scan takes 0.71 ms forward at (8, 1536, 4096) = our (B, T, C) =
(8, 4096, 1536) on its GPU.

GPU: (8, 4096, 1536) and (8, 16384, 1536) in bf16 (compile at the first only). CPU: (4, 512, 128) fp32,
eager, compile and the sequential loop (the float64 reference's code path) only.

Variants: loop (linear_scan_ref, CPU only), eager (linear_scan's eager parallel scan), compile
(torch.compile of the eager scan), triton (linear_scan launched eagerly), triton-graph (the same call
replayed from a CUDA graph: the kernel-bound figure).

SSD vs attention (forward+backward, tokens/s): width H * P = 2048 on a GPU (H = 32 heads of P = 64,
N = 128, G = 1, chunk 64; attention 32 heads of 64), T = 4096 and 16384, B = 2, bf16; ssd is the eager chunked
SSD, ssd-triton the Triton kernels (GPU only: the interpreter is no performance path), ssd-compile
torch.compile of the eager chunked SSD (GPU only: on 2 CPU cores its compile alone takes minutes). Attention FLOPs
(causal, fwd+bwd) = 3.5 * 2 * B H T^2 D; the SSD's chunked form is O(T) and is reported in time only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, graphed_inputs, measure, replay_graph, requires_gpu, tensor_bytes

from nanollama.kernels import _scan_launch
from nanollama.kernels import scan as scan_mod

if DEVICE.type == "cuda":
    SHAPES = [(8, 4096, 1536), (8, 16384, 1536)]
    DTYPE = torch.bfloat16
    VARIANTS = ["triton", "triton-graph", "eager", "compile"]  # the target's variants first: the stage is short
    SSD_CASES = [(2, 4096, 32, 64, 128), (2, 16384, 32, 64, 128)]  # (B, T, H, P, N)
else:
    SHAPES = [(4, 512, 128)]
    DTYPE = torch.float32  # the CPU's native type
    VARIANTS = ["loop", "eager", "compile"]
    SSD_CASES = [(1, 512, 4, 16, 16)]

_compiled = {}


def _eager(a, b):
    return scan_mod.linear_scan(a, b)


def _op(variant: str):
    if variant == "loop":
        return scan_mod.linear_scan_ref
    if variant == "eager":
        return _eager
    if variant.startswith("triton"):
        requires_gpu()
        return _eager  # the same public call; the dispatch mode picks Triton
    if "scan" not in _compiled:
        _compiled["scan"] = torch.compile(_eager, dynamic=False)
    return _compiled["scan"]


def _shape_id(shape):
    B, T, C = shape
    return f"B{B}-T{T}-C{C}"


def _make(B, T, C, requires_grad):
    def make():
        a = torch.rand(B, T, C, device=DEVICE, dtype=DTYPE) * 0.5 + 0.45  # decays in (0.45, 0.95)
        b = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE)
        if not requires_grad:
            return a, b
        a.requires_grad_(), b.requires_grad_()
        return a, b, torch.randn_like(a)

    return make


def _setup(benchmark, passes, shape, variant, monkeypatch):
    # eager and compile must time the eager scan even on a GPU, where auto would pick Triton
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton" if variant.startswith("triton") else "reference")
    benchmark.group = f"scan-{passes}-{_shape_id(shape)}"
    if variant == "compile" and shape[1] > 4096:
        pytest.skip("compile is timed at the first shape only (its unrolled chunk loops take long to compile)")
    return _op(variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_scan_forward(benchmark, shape, variant, monkeypatch):
    """Forward only, no grad. GB/s = 3 B T C e / time."""
    op = _setup(benchmark, "fwd", shape, variant, monkeypatch)
    make = _make(*shape, requires_grad=False)
    a, b = make()
    moved = 3 * tensor_bytes(a)
    fn, sets = (replay_graph, graphed_inputs(op, make)) if variant == "triton-graph" else (op, make)
    with torch.no_grad():
        measure(benchmark, fn, sets, bytes=moved, dtype=DTYPE, shapes={"a": a.shape}, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_scan_forward_backward(benchmark, shape, variant, monkeypatch):
    """Forward + backward (torch.autograd.grad into a and b). GB/s = 8 B T C e / time."""
    op = _setup(benchmark, "fwdbwd", shape, variant, monkeypatch)
    make = _make(*shape, requires_grad=True)

    def step(a, b, g):
        h, _ = op(a, b)
        return torch.autograd.grad(h, (a, b), g)

    a = make()[0]
    moved = 8 * tensor_bytes(a)
    fn, sets = (replay_graph, graphed_inputs(step, make)) if variant == "triton-graph" else (step, make)
    measure(benchmark, fn, sets, bytes=moved, dtype=DTYPE, shapes={"a": a.shape}, variant=variant)


TILES = [(64, 32, 4, 1), (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (256, 32, 8, 2), (32, 32, 2, 3)]


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "T{}-C{}-w{}-s{}".format(*t))
def test_scan_tiles(benchmark, tile, monkeypatch):
    """GPU only: forward+backward of the first shape with other (BLOCK_T, BLOCK_C, num_warps, num_stages)
    tiles than _scan_launch.GPU_TILE, to choose that fixed tile from data. GB/s = 8 B T C e / time."""
    requires_gpu("tile sweeps")
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    monkeypatch.setattr(_scan_launch, "GPU_TILE", tile)
    shape = SHAPES[0]
    benchmark.group = f"scan-tiles-{_shape_id(shape)}"
    make = _make(*shape, requires_grad=True)

    def step(a, b, g):
        h, _ = scan_mod.linear_scan(a, b)
        return torch.autograd.grad(h, (a, b), g)

    a = make()[0]
    measure(benchmark, step, make, bytes=8 * tensor_bytes(a), dtype=DTYPE, shapes={"a": a.shape}, tile=list(tile))


# ----------------------------------------------------------------------------- SSD vs attention


def _case_id(case):
    B, T, H, P, N = case
    return f"B{B}-T{T}-H{H}-P{P}-N{N}"


def _ssd_step(x, dt, A, Bm, Cm, g):
    y, _ = scan_mod.ssd_scan(x, dt, A, Bm, Cm)
    return torch.autograd.grad(y, (x, dt, Bm, Cm), g)


def _sdpa_step(q, k, v, g):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.autograd.grad(out, (q, k, v), g)


SSD_VARIANTS = ["sdpa-causal", "ssd", "ssd-triton"] + (["ssd-compile"] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("variant", SSD_VARIANTS)
@pytest.mark.parametrize("case", SSD_CASES, ids=_case_id)
def test_ssd_vs_attention(benchmark, case, variant, monkeypatch):
    """Forward + backward of one mixing layer's core at width H * P: the chunked SSD (no projections,
    conv or gate) against causal attention with H heads of P. tokens/s in extra_info."""
    B, T, H, P, N = case
    dtype = DTYPE
    benchmark.group = f"ssd-vs-attention-{_case_id(case)}"
    if variant == "ssd-triton":
        requires_gpu()
    # ssd and ssd-compile time the eager chunked form even on a GPU, where auto would pick Triton
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton" if variant == "ssd-triton" else "reference")

    if variant.startswith("ssd"):

        def make():
            x = torch.randn(B, T, H, P, device=DEVICE, dtype=dtype, requires_grad=True)
            dt = F.softplus(torch.randn(B, T, H, device=DEVICE) - 2).to(dtype).requires_grad_()
            A = -torch.rand(H, device=DEVICE) - 0.5
            Bm = (torch.randn(B, T, 1, N, device=DEVICE) / N**0.5).to(dtype).requires_grad_()
            Cm = (torch.randn(B, T, 1, N, device=DEVICE) / N**0.5).to(dtype).requires_grad_()
            return x, dt, A, Bm, Cm, torch.randn_like(x)

        fn = _ssd_step
        if variant == "ssd-compile":
            fn = _compiled.setdefault("ssd", torch.compile(_ssd_step, dynamic=False))
        flops = None
    else:

        def make():
            q, k, v = (torch.randn(B, H, T, P, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
            return q, k, v, torch.randn_like(q)

        fn = _sdpa_step
        flops = int(3.5 * 2 * B * H * T * T * P)  # causal: half of 2 matmuls of 2 B H T^2 P each, x3.5 fwd+bwd
    info = measure(benchmark, fn, make, flops=flops, dtype=dtype, shapes={"x": (B, T, H, P)}, variant=variant)
    if info:
        benchmark.extra_info["tokens_per_s"] = round(B * T / info["median_s"], 1)
