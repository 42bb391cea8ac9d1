"""Linear scans and Mamba-2's SSD: the eager parallel scan, the Triton kernels (under the interpreter on
the CPU) and the chunked SSD against sequential float64 references, forward and backward with random
upstream gradients (into h_last too); chunked equals stepwise; carried states; tracing; bad input.

The interpreter runs tl.associative_scan one element at a time (~0.2 ms each), so the Triton cases keep
B * T * C small; the long ones are marked slow.
"""

import types

import pytest
import torch
from scan_inputs import ssd_inputs
from sm90 import compile_offline

from nanollama.kernels import _scan_launch, dispatch
from nanollama.kernels import scan as scan_mod
from nanollama.kernels.scan import (
    linear_scan,
    linear_scan_log,
    linear_scan_log_ref,
    linear_scan_log_step,
    linear_scan_ref,
    linear_scan_step,
    ssd_scan,
    ssd_scan_ref,
    ssd_step,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as in tests/kernels/conftest.py

# One tolerance table, against float64 on the same (rounded) inputs. The scans here contract (|a| < 1),
# so errors stay a few roundings of values of size ~3 at any T: fp32 ~1e-6, fp16 one rounding of the
# stored h and gradients (2^-11 relative), bf16 (2^-8).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=4e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}


def _inputs(B, T, C, dtype, with_h0=True, seed=0, negative=True):
    g = torch.Generator().manual_seed(seed)
    low = -0.2 if negative else 0.05  # a < 0 and a = 0-ish included: the scans must not take logs of a
    a = (low + (0.99 - low) * torch.rand(B, T, C, generator=g)).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(B, T, C, generator=g).to(DEVICE, dtype).requires_grad_()
    h0 = torch.randn(B, C, generator=g).to(DEVICE, dtype).requires_grad_() if with_h0 else None
    return a, b, h0


def _grads(fn, inputs, seed=1):
    """Outputs and gradients of fn(*inputs) -> (h, h_last) under shared random upstream gradients."""
    h, last = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gh = torch.randn(h.shape, generator=g).to(DEVICE, torch.float64)
    gl = torch.randn(last.shape, generator=g).to(DEVICE, torch.float64)
    loss = (h.double() * gh).sum() + (last.double() * gl).sum()
    wrt = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [h, last] + [torch.zeros_like(t) if d is None else d for t, d in zip(wrt, grads)]


def _as64(inputs):
    return [None if t is None else t.detach().double().requires_grad_() for t in inputs]


def _assert_close(got, want, dtype):
    for i, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x.double(), y.double(), **TOL[dtype], msg=lambda m, i=i: f"output {i}: {m}")


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")


# ----------------------------------------------------------------------------- elementwise scan


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("T", [1, 7, 127, 1000])
def test_eager_matches_float64_loop(eager, T, with_h0):
    inputs = _inputs(3, T, 5, torch.float64, with_h0)
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, inputs), torch.float64)
    inputs32 = _inputs(3, T, 5, torch.float32, with_h0)
    _assert_close(_grads(linear_scan, inputs32), _grads(linear_scan_ref, _as64(inputs32)), torch.float32)


@pytest.mark.parametrize(
    "B, T, C, dtype",
    [(2, 1, 5, torch.float32), (2, 7, 5, torch.float32), (1, 127, 3, torch.float32), (2, 7, 3, torch.float16)],
    ids=["T1", "T7", "T127", "T7-fp16"],
)
def test_triton_matches_float64_loop(triton_kernels, B, T, C, dtype):
    inputs = _inputs(B, T, C, dtype)
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, _as64(inputs)), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_float64_loop_long(triton_kernels, dtype):
    """T = 1000 > the interpreter's 256-row chunks: the state crosses chunk borders; C = 3 of 4 lanes."""
    inputs = _inputs(1, 1000, 3, dtype, seed=3)
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, _as64(inputs)), dtype)


def test_triton_gpu_tiling_under_interpreter(triton_kernels, monkeypatch):
    """The GPU's small chunks (many chunks, channel blocks, partial last ones), with strided inputs."""
    monkeypatch.setattr(_scan_launch, "_blocks", lambda T, C, on_gpu: (4, 2, 1, 1))
    a, b, h0 = (t.detach() for t in _inputs(2, 11, 10, torch.float32, seed=4))
    ab = torch.cat((a, b), -1).transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, 2C) view, T-major storage
    a_v = ab[..., 1:6].requires_grad_()  # (B, T, 5) views: no dimension contiguous in the usual order
    b_v = ab[..., 11:16].requires_grad_()
    h0_v = h0[:, ::2].requires_grad_()  # (B, 5), stride 2
    inputs = [a_v, b_v, h0_v]
    assert not a_v.is_contiguous() and not h0_v.is_contiguous()
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, _as64(inputs)), torch.float32)


@pytest.mark.parametrize(
    "segments, with_h0",
    [(3, True), pytest.param(2, False, marks=pytest.mark.slow), pytest.param(7, True, marks=pytest.mark.slow)],
    ids=["S3-h0", "S2-zeros", "S7-h0"],
)
def test_triton_sequence_split_into_segments(triton_kernels, monkeypatch, segments, with_h0):
    """A GPU short of programs splits T into segments (first pass, carry scan, second pass), forward and
    backward: 23 steps in 4-step chunks give 2, 3 and 6 segments, the last one partial."""
    monkeypatch.setattr(_scan_launch, "_blocks", lambda T, C, on_gpu: (4, 2, 1, 1))
    monkeypatch.setattr(_scan_launch, "_segments", lambda *args: segments)
    inputs = _inputs(1, 23, 3, torch.float32, with_h0, seed=22)
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, _as64(inputs)), torch.float32)
    log_inputs = _log_inputs(1, 23, 3, torch.float32, with_h0, seed=22)
    _assert_close(_grads(linear_scan_log, log_inputs), _grads(linear_scan_log_ref, _as64(log_inputs)), torch.float32)


def test_segment_count_rule(monkeypatch):
    """1 on the CPU; on a GPU only under 2 programs per SM, then ~4 per SM, each segment >= 4 chunks."""
    assert _scan_launch._segments(1, 8192, 64, 64, 32, torch.zeros(1)) == 1  # CPU tensors: never split
    monkeypatch.setattr(_scan_launch, "_sm_count", lambda index: 132)  # an H200
    gpu = types.SimpleNamespace(is_cuda=True, get_device=lambda: 0)
    assert _scan_launch._segments(8, 4096, 1536, 64, 32, gpu) == 1  # the shape: 384 programs
    assert _scan_launch._segments(8, 4096, 512, 64, 32, gpu) == 5  # 128 programs -> 4 * 132 / 128
    assert _scan_launch._segments(8, 512, 512, 64, 32, gpu) == 2  # capped: segments of >= 4 chunks


def test_eager_and_triton_agree(triton_kernels, monkeypatch):
    inputs = _inputs(2, 33, 3, torch.float32, seed=5)
    got = _grads(linear_scan, inputs)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    _assert_close(got, _grads(linear_scan, inputs), torch.float32)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_chunked_equals_stepwise_and_halves_carry_the_state(monkeypatch, path, request):
    if path == "triton":
        request.getfixturevalue("triton_kernels")
    else:
        monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    a, b, h0 = (t.detach() for t in _inputs(2, 19, 3, torch.float32, seed=6))
    h, last = linear_scan(a, b, h0)
    state, outs = h0, []
    for t in range(a.shape[1]):
        out, state = linear_scan_step(state, a[:, t], b[:, t])
        outs.append(out)
    torch.testing.assert_close(h, torch.stack(outs, 1), **TOL[torch.float32])
    torch.testing.assert_close(last, state, **TOL[torch.float32])
    h1, mid = linear_scan(a[:, :8], b[:, :8], h0)
    h2, last2 = linear_scan(a[:, 8:], b[:, 8:], mid)
    torch.testing.assert_close(torch.cat((h1, h2), 1), h, **TOL[torch.float32])
    torch.testing.assert_close(last2, last, **TOL[torch.float32])


def test_mixed_dtypes_are_promoted(eager):
    """Under autocast a (from an fp32 parameter) and b (from a bf16 matmul) can differ: both go to fp32."""
    a, b, h0 = _inputs(2, 5, 3, torch.float32, seed=18)
    b16 = b.detach().to(torch.bfloat16).requires_grad_()
    h, last = linear_scan(a, b16, h0)
    assert h.dtype == last.dtype == torch.float32
    want, _ = linear_scan_ref(a, b16.float(), h0)
    torch.testing.assert_close(h, want)
    (grad_b,) = torch.autograd.grad(h.sum(), b16)
    assert grad_b.dtype == torch.bfloat16


def test_empty_sequence_returns_the_initial_state(eager):
    a, b, h0 = _inputs(2, 0, 3, torch.float32)
    h, last = linear_scan(a, b, h0)
    assert h.shape == (2, 0, 3)
    torch.testing.assert_close(last, h0)
    _, last = linear_scan(a, b)
    assert torch.equal(last, torch.zeros(2, 3, device=DEVICE))


def test_gradient_only_into_h_last(triton_kernels):
    """Zero-stride (expanded) and missing upstream gradients reach the kernels' backward correctly."""
    a, b, h0 = _inputs(1, 9, 3, torch.float32, seed=7)
    _, last = linear_scan(a, b, h0)
    got = torch.autograd.grad(last.sum(), (a, b, h0))  # grad_h is None, grad_last an expanded 1
    a64, b64, h064 = _as64((a, b, h0))
    _, last_ref = linear_scan_ref(a64, b64, h064)
    want = torch.autograd.grad(last_ref.sum(), (a64, b64, h064))
    _assert_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- log space


def _log_inputs(B, T, C, dtype, with_h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    la = torch.log(torch.rand(B, T, C, generator=g) * 0.98 + 0.01).to(DEVICE, dtype).requires_grad_()
    lb = torch.randn(B, T, C, generator=g).to(DEVICE, dtype).requires_grad_()
    lh0 = torch.randn(B, C, generator=g).to(DEVICE, dtype).requires_grad_() if with_h0 else None
    return la, lb, lh0


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("T", [1, 7, 127, 1000])
def test_log_eager_matches_float64_loop(eager, T, with_h0):
    inputs = _log_inputs(2, T, 5, torch.float64, with_h0)
    _assert_close(_grads(linear_scan_log, inputs), _grads(linear_scan_log_ref, inputs), torch.float64)


@pytest.mark.parametrize(
    "T, dtype", [(7, torch.float32), (127, torch.float32), (7, torch.float16)], ids=["T7", "T127", "T7-fp16"]
)
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
def test_log_triton_matches_float64_loop(triton_kernels, T, dtype, with_h0):
    inputs = _log_inputs(1, T, 3, dtype, with_h0, seed=T)
    _assert_close(_grads(linear_scan_log, inputs), _grads(linear_scan_log_ref, _as64(inputs)), dtype)


def test_log_scan_equals_the_linear_scan_of_exponentials(eager):
    la, lb, lh0 = (t.detach() for t in _log_inputs(2, 50, 4, torch.float64, seed=8))
    log_h, log_last = linear_scan_log(la, lb, lh0)
    h, last = linear_scan(la.exp(), lb.exp(), lh0.exp())
    torch.testing.assert_close(log_h, h.log(), **TOL[torch.float64])
    torch.testing.assert_close(log_last, last.log(), **TOL[torch.float64])


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_log_scan_is_stable_where_cumsums_are_not(monkeypatch, path, request):
    """T = 3000 with log a = -2: a cumsum-based form needs exp(6000); the scan stays exact (h -> b / (1 - a))."""
    if path == "triton":
        request.getfixturevalue("triton_kernels")
    else:
        monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    T = 3000 if path == "reference" else 600
    la = torch.full((1, T, 1), -2.0, device=DEVICE)
    lb = torch.zeros(1, T, 1, device=DEVICE)  # b = 1
    log_h, _ = linear_scan_log(la, lb)
    fixed = -torch.log1p(-torch.exp(torch.tensor(-2.0, dtype=torch.float64)))  # log(1 / (1 - a))
    assert torch.isfinite(log_h).all()
    torch.testing.assert_close(log_h[0, -1, 0].double(), fixed.to(DEVICE), **TOL[torch.float32])


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_log_scan_resets_and_left_padding(monkeypatch, path, request):
    """As minGRU packs and pads: log a = -inf restarts the state; leading (log a, log b) = (0, -inf) pads
    keep h = 0 (log h = -inf). Gradients stay finite and equal those of the unpadded sequence."""
    if path == "triton":
        request.getfixturevalue("triton_kernels")
    else:
        monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    la, lb = (t.detach() for t in _log_inputs(1, 12, 3, torch.float32, with_h0=False, seed=21)[:2])
    la[:, 6] = float("-inf")  # a document starts at 6
    la64, lb64 = la.double().requires_grad_(), lb.double().requires_grad_()
    want = _grads(linear_scan_log_ref, [la64, lb64])
    pad_a = torch.cat((torch.zeros(1, 4, 3, device=DEVICE), la), 1).requires_grad_()
    pad_b = torch.cat((torch.full((1, 4, 3), float("-inf"), device=DEVICE), lb), 1).requires_grad_()
    log_h, last = linear_scan_log(pad_a, pad_b)
    assert torch.isneginf(log_h[:, :4]).all()
    g = torch.Generator().manual_seed(1)  # the upstream gradients _grads draws, with zeros on the pads
    gh = torch.randn(1, 12, 3, generator=g).to(DEVICE, torch.float64)
    gl = torch.randn(1, 3, generator=g).to(DEVICE, torch.float64)
    loss = (log_h[:, 4:].double() * gh).sum() + (last.double() * gl).sum()
    grad_a, grad_b = torch.autograd.grad(loss, (pad_a, pad_b))
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    _assert_close([log_h[:, 4:], last, grad_a[:, 4:], grad_b[:, 4:]], want, torch.float32)


def test_log_step_matches_the_scan(eager):
    la, lb, lh0 = (t.detach() for t in _log_inputs(2, 9, 3, torch.float32, seed=9))
    log_h, last = linear_scan_log(la, lb, lh0)
    state = lh0
    for t in range(9):
        out, state = linear_scan_log_step(state, la[:, t], lb[:, t])
        torch.testing.assert_close(out, log_h[:, t], **TOL[torch.float32])
    torch.testing.assert_close(state, last, **TOL[torch.float32])


# ----------------------------------------------------------------------------- SSD


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("T, chunk", [(1, 16), (7, 4), (37, 16), (130, 64)])
def test_ssd_chunked_matches_float64_loop(T, chunk, with_h0):
    inputs = ssd_inputs(2, T, 4, 3, 2, 5, torch.float64, with_h0, seed=T)
    _assert_close(
        _grads(lambda *t: ssd_scan(*t, chunk_size=chunk), inputs), _grads(ssd_scan_ref, inputs), torch.float64
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_ssd_low_precision_against_float64(dtype):
    inputs = ssd_inputs(1, 45, 2, 4, 1, 8, dtype, seed=11)
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=16), inputs)
    _assert_close(got, _grads(ssd_scan_ref, _as64(inputs)), dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype


def test_ssd_chunked_equals_stepwise_and_halves_carry_the_state():
    x, dt, A, Bm, Cm, h0 = (t.detach() for t in ssd_inputs(2, 21, 4, 3, 2, 5, torch.float32, seed=12))
    y, last = ssd_scan(x, dt, A, Bm, Cm, h0, chunk_size=8)
    state, ys = h0, []
    for t in range(21):
        out, state = ssd_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(out)
    torch.testing.assert_close(y, torch.stack(ys, 1), **TOL[torch.float32])
    torch.testing.assert_close(last, state, **TOL[torch.float32])
    y1, mid = ssd_scan(x[:, :10], dt[:, :10], A, Bm[:, :10], Cm[:, :10], h0, chunk_size=8)
    y2, last2 = ssd_scan(x[:, 10:], dt[:, 10:], A, Bm[:, 10:], Cm[:, 10:], mid, chunk_size=8)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y, **TOL[torch.float32])
    torch.testing.assert_close(last2, last, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_ssd_resets_match_float64_loop(dtype):
    """Resets at the start, at a chunk border (16), just before it (15) and at random inside chunks."""
    inputs = ssd_inputs(2, 37, 4, 3, 2, 5, dtype, seed=19)
    reset = torch.rand(2, 37, generator=torch.Generator().manual_seed(19)) < 0.1
    reset[0, 0] = reset[1, 15] = reset[1, 16] = True
    reset = reset.to(DEVICE)
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=8, reset=reset), inputs)
    assert not any(torch.isnan(t).any() for t in got)
    _assert_close(got, _grads(lambda *t: ssd_scan_ref(*t, reset=reset), _as64(inputs)), dtype)


def test_ssd_packed_documents_equal_each_alone():
    x, dt, A, Bm, Cm, _ = (
        t.detach() if t is not None else None for t in ssd_inputs(1, 30, 2, 3, 1, 4, torch.float32, seed=20)
    )
    reset = torch.zeros(1, 30, dtype=torch.bool, device=DEVICE)
    reset[0, 11] = True  # documents [0, 11) and [11, 30)
    y, last = ssd_scan(x, dt, A, Bm, Cm, chunk_size=8, reset=reset)
    y1, _ = ssd_scan(x[:, :11], dt[:, :11], A, Bm[:, :11], Cm[:, :11], chunk_size=8)
    y2, last2 = ssd_scan(x[:, 11:], dt[:, 11:], A, Bm[:, 11:], Cm[:, 11:], chunk_size=8)
    torch.testing.assert_close(y, torch.cat((y1, y2), 1), **TOL[torch.float32])
    torch.testing.assert_close(last, last2, **TOL[torch.float32])


def test_ssd_chunk_size_does_not_change_the_result():
    inputs = [t.detach() for t in ssd_inputs(1, 50, 2, 3, 2, 4, torch.float64, seed=13)]
    want = ssd_scan(*inputs, chunk_size=1)
    for chunk in (3, 16, 50, 64):
        _assert_close(ssd_scan(*inputs, chunk_size=chunk), want, torch.float64)


# ----------------------------------------------------------------------------- ops, tracing, dispatch


def test_opcheck(triton_kernels):
    """Schema, fake tensors and AOT dispatch of both ops (their autograd is _LinearScan, outside the ops)."""
    a, b, h0 = (t.detach() for t in _inputs(1, 5, 3, torch.float32, seed=14))
    torch.library.opcheck(torch.ops.nanollama.linear_scan.default, (a, b, h0, False))
    g, gl = torch.randn_like(a), torch.randn_like(h0)
    torch.library.opcheck(torch.ops.nanollama.linear_scan_bwd.default, (a, b, None, g, gl))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_compile_has_no_graph_break(monkeypatch, path):
    if path == "triton":
        pytest.importorskip("triton")
        if DEVICE.type == "cpu" and not dispatch.interpreter_on():
            pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("NANOLLAMA_KERNELS", path)
    a, b, h0 = _inputs(1, 6, 3, torch.float32, seed=15)
    la, lb, _ = _log_inputs(1, 6, 3, torch.float32, seed=15)

    def loss(a, b, h0, la, lb):
        h, last = linear_scan(a, b, h0)
        log_h, _ = linear_scan_log(la, lb)
        return (h * h.flip(1)).sum() + last.square().sum() + log_h.exp().sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(a, b, h0, la, lb).graph_break_count == 0
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(a, b, h0, la, lb)
    want = loss(a, b, h0, la, lb)
    torch.testing.assert_close(got, want)
    for x, y in zip(torch.autograd.grad(got, (a, b, h0, la, lb)), torch.autograd.grad(want, (a, b, h0, la, lb))):
        torch.testing.assert_close(x, y)


def test_dispatch_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(scan_mod, "eager_forward", lambda *a: calls.append("eager") or torch.zeros(a[0].shape))
    a, b, _ = (t.detach() for t in _inputs(1, 3, 2, torch.float32))
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    linear_scan(a.cpu(), b.cpu())  # auto on CPU tensors: eager
    assert calls == ["eager"]
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    linear_scan(a.double(), b.double())  # float64 always takes the eager path
    assert calls == ["eager", "eager"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: linear_scan(torch.zeros(2, 3), torch.zeros(2, 3)), "must be (B, T, C)"),
        (lambda: linear_scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 4)), "of one shape"),
        (lambda: linear_scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(2, 2)), "h0 must be (B, C)"),
        (lambda: linear_scan_log(torch.zeros(1, 3, 2, dtype=torch.int64), torch.zeros(1, 3, 2)), "float dtype"),
        (lambda: ssd_scan(*_bad_ssd(H=3, G=2)), "multiple of the groups"),
        (lambda: ssd_scan(*_bad_ssd(H=2, G=1, A_shape=(3,))), "A must be (H,)"),
        (lambda: ssd_scan(*_bad_ssd(H=2, G=1), chunk_size=0), "chunk_size must be a positive int"),
        (lambda: ssd_scan(*_bad_ssd(H=2, G=1), reset=torch.zeros(1, 4)), "reset must be a (B, T) = (1, 4) bool"),
    ],
    ids=["rank", "shapes", "h0", "int", "groups", "A", "chunk", "reset"],
)
def test_bad_input_is_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def _bad_ssd(H, G, A_shape=None):
    B, T, P, N = 1, 4, 2, 3
    return (torch.zeros(B, T, H, P), torch.ones(B, T, H), -torch.ones(A_shape or (H,)), torch.zeros(B, T, G, N),
            torch.zeros(B, T, G, N))  # fmt: skip


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) accepts both kernels, every flag, for sm_90. Needs no GPU."""
    stdout = compile_offline("sm90_compile_scan.py")
    assert "ok" in stdout


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(3, 1031, 200), (16, 300, 2050)], ids=["split", "one-segment"])
def test_cuda_scan_training_shape(monkeypatch, dtype, shape):
    """auto on CUDA runs the Triton ops; model-like shapes (many chunks, C not a multiple of 32): 3 x 200
    channels leave the GPU short of programs (the sequence is split into segments), 16 x 2050 do not."""
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    calls = []
    launch = _scan_launch._launch_scan
    monkeypatch.setattr(_scan_launch, "_launch_scan", lambda *a: calls.append(a[-1]) or launch(*a))
    inputs = _inputs(*shape, dtype, seed=16)
    _assert_close(_grads(linear_scan, inputs), _grads(linear_scan_ref, _as64(inputs)), dtype)
    log_inputs = _log_inputs(*shape, dtype, seed=16)
    _assert_close(_grads(linear_scan_log, log_inputs), _grads(linear_scan_log_ref, _as64(log_inputs)), dtype)
    assert calls == [False, True]


@pytest.mark.gpu
def test_cuda_compile_inductor(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    a, b, h0 = _inputs(2, 300, 64, torch.bfloat16, seed=17)
    fn = torch.compile(lambda a, b, h0: [t.float().square().sum() for t in linear_scan(a, b, h0)], fullgraph=True)
    torch.testing.assert_close(fn(a, b, h0), [t.float().square().sum() for t in linear_scan(a, b, h0)])
