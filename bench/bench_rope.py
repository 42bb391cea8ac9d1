"""RoPE: fused Triton kernel against the eager reference and torch.compile of the eager code.

Bytes per pass = read q and k + write q_out and k_out = 2 * (B*S*Hq*D + B*S*Hk*D) * element size
(the cos/sin tables are small and stay in cache). Forward+backward is two passes: the backward
reads the two upstream gradients and writes dq and dk.

GPU: B=8, S=2048 and 8192, Hq=32, Hk=8, D=128 in bf16. CPU: a small shape, eager and compile only.
Floors on an H200 (measured copy ceiling 4.3 TB/s): S=2048 moves 335.5 MB per pass, so 78 us
forward and 156 us forward+backward; S=8192, four times that. Targets (issue 4): triton
forward+backward >= 4x eager, >= 75% of HBM bandwidth, call_mem_bytes <= half of eager's.
q and k are views of one fused QKV projection output, as the model produces them.

Variants: eager (rope_ref), triton (apply_rope, launched eagerly: host time included), triton-graph
(the same call captured once per input set into a CUDA graph, outside the timing, and replayed: the
kernel-bound figure; GPU only), compile (torch.compile of the eager code). The eager triton call
costs ~15-40 us of host time forward and more with autograd, a sizeable part of the ~78 us floor at
S=2048, so read kernel efficiency off triton-graph. Its memory columns mean nothing: the graph's
outputs live in its private pool, allocated at capture.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, graphed_inputs, measure, replay_graph, requires_gpu, tensor_bytes

from nanollama.kernels import rope as rope_mod

if DEVICE.type == "cuda":
    SHAPES = [(8, 2048, 32, 8, 128), (8, 8192, 32, 8, 128)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(2, 256, 8, 2, 64)]
    DTYPE = torch.float32  # the CPU's native type; bf16 on the CPU measures conversion, not RoPE

VARIANTS = ["eager", "triton", "triton-graph", "compile"]


def _eager(q, k, cos, sin):
    return rope_mod.rope_ref(q, cos, sin), rope_mod.rope_ref(k, cos, sin)


def _triton(q, k, cos, sin):
    return rope_mod.apply_rope(q, k, cos, sin)


_compiled = {}


def _op(variant: str):
    if variant == "eager":
        return _eager
    if variant in ("triton", "triton-graph"):
        requires_gpu()
        return _triton
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_eager, dynamic=False)  # one static graph per shape, as a model would
    return _compiled["fn"]


def _inputs(B, S, Hq, Hk, D, requires_grad):
    """q, k as views of one (B, S, (Hq + 2 Hk) * D) projection output; fresh random values."""
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=DEVICE, dtype=DTYPE)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)  # (B, S, Hq, D), stride over S = (Hq + 2 Hk) * D
    k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D)
    if requires_grad:
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()  # leaves, still strided views
    return q, k


def _shape_id(shape):
    B, S, Hq, Hk, D = shape
    return f"B{B}-S{S}-Hq{Hq}-Hk{Hk}-D{D}"


def _setup(benchmark, passes: str, shape, variant: str, monkeypatch):
    """The variant's dispatch mode and op, the benchmark group, and the (cos, sin) tables: (op, cos, sin)."""
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton" if variant.startswith("triton") else "auto")
    benchmark.group = f"rope-{passes}-{_shape_id(shape)}"
    S, D = shape[1], shape[4]
    return (_op(variant), *rope_mod.rope_frequencies(S, D, device=DEVICE))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_rope_forward(benchmark, shape, variant, monkeypatch):
    """Forward only. GB/s = 2 * (|q| + |k|) bytes / time."""
    op, cos, sin = _setup(benchmark, "fwd", shape, variant, monkeypatch)
    B, S, Hq, Hk, D = shape

    def make():
        q, k = _inputs(B, S, Hq, Hk, D, requires_grad=False)
        return q, k, cos, sin

    q, k, _, _ = make()
    moved = 2 * tensor_bytes(q, k)
    fn, sets = (replay_graph, graphed_inputs(op, make)) if variant == "triton-graph" else (op, make)
    with torch.no_grad():  # also around the capture: the graph holds the no-grad forward
        measure(benchmark, fn, sets, bytes=moved, dtype=DTYPE, shapes={"q": q.shape, "k": k.shape}, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_rope_forward_backward(benchmark, shape, variant, monkeypatch):
    """Forward + backward (torch.autograd.grad, no .grad accumulation). GB/s = 4 * (|q| + |k|) / time."""
    op, cos, sin = _setup(benchmark, "fwdbwd", shape, variant, monkeypatch)
    B, S, Hq, Hk, D = shape

    def make():
        q, k = _inputs(B, S, Hq, Hk, D, requires_grad=True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        return q, k, cos, sin, gq, gk

    def step(q, k, cos, sin, gq, gk):
        q_out, k_out = op(q, k, cos, sin)
        return torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))

    q, k = make()[:2]
    moved = 4 * tensor_bytes(q, k)
    # triton-graph captures the whole step, torch.autograd.grad included (autograd's backward runs on
    # the capturing stream, as in torch.cuda.graphs' whole-network example): the graph then holds
    # exactly the GPU work of the public call (forward and conjugate-rotation launches and their
    # allocations), not a hand-picked pair of private launches that could drift from it.
    fn, sets = (replay_graph, graphed_inputs(step, make)) if variant == "triton-graph" else (step, make)
    measure(benchmark, fn, sets, bytes=moved, dtype=DTYPE, shapes={"q": q.shape, "k": k.shape}, variant=variant)
