"""Mamba-2's SSD on the Triton path (under the interpreter on the CPU): forward and backward against the
float64 sequential reference and against the eager chunked form, with random upstream gradients into y and
h_last; odd T (1, 7, 127, 300), a carried h0, G < H, chunk lengths that are not powers of two, tiled P and N;
document resets; the ops' schemas and fake impls; dispatch; tracing.

The interpreter cannot do bf16 tl.dot (silent garbage), so bf16 runs only on a GPU. Sizes stay tiny: the
interpreter costs per operation, not per element, so T (the number of chunks) is what costs.
"""

import pytest
import torch
from scan_inputs import ssd_inputs
from sm90 import compile_offline

from nanollama.kernels import _ssd_launch, dispatch
from nanollama.kernels import ssd as ssd_mod
from nanollama.kernels.ssd import ssd_scan, ssd_scan_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as in tests/kernels/conftest.py

# Against float64 on the same rounded inputs. fp32: dots in IEEE fp32, a few roundings of O(1) values;
# fp16: the dots' operands (and the decay-weighted scores) are rounded to fp16 (2^-11) before the dot.
TOL = {
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=8e-2, rtol=4e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _as64(inputs):
    return [None if t is None else t.detach().double().requires_grad_() for t in inputs]


def _grads(fn, inputs, seed=1):
    """[y, h_last, grads of every non-None input] under shared random upstream gradients into y and h_last."""
    y, last = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(DEVICE, torch.float64)
    gl = torch.randn(last.shape, generator=g).to(DEVICE, torch.float64)
    loss = (y.double() * gy).sum() + (last.double() * gl).sum()
    wrt = [t for t in inputs if t is not None]
    return [y, last, *torch.autograd.grad(loss, wrt)]


def _assert_close(got, want, **tol):
    names = ["y", "h_last", "dx", "ddt", "dA", "dB", "dC", "dh0"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("T, chunk", [(1, 16), (7, 4), (127, 32), pytest.param(300, 64, marks=pytest.mark.slow)])
def test_triton_matches_float64_loop(triton_kernels, T, chunk, dtype):
    """G = 2 < H = 4, h0 carried, T not a multiple of the chunk (but 1)."""
    inputs = ssd_inputs(2 if T < 100 else 1, T, 4, 3, 2, 5, dtype, seed=T)
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=chunk), inputs)
    _assert_close(got, _grads(ssd_scan_ref, _as64(inputs)), **TOL[dtype])
    assert got[0].dtype == dtype and got[1].dtype == dtype


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
def test_triton_matches_eager_chunked(triton_kernels, monkeypatch, with_h0):
    """The same fp32 inputs through both chunked forms, with a chunk of 24 (padded to a 32-row block) and P, N
    split into 16-wide tiles (as on a GPU: several state tiles and the output's loop over N)."""
    monkeypatch.setattr(_ssd_launch, "GPU_TILE", (16, 16, 1, 1))
    blocks = _ssd_launch._blocks
    monkeypatch.setattr(_ssd_launch, "_blocks", lambda L, P, N, on_gpu: blocks(L, P, N, True))
    inputs = ssd_inputs(1, 53, 2, 20, 1, 40, torch.float32, with_h0, seed=3)
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=24), inputs)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    want = _grads(lambda *t: ssd_scan(*t, chunk_size=24), inputs)
    _assert_close(got, want, **TOL[torch.float32])


def test_triton_halves_carry_the_state(triton_kernels):
    """Two calls, the second from the first's h_last, equal one call (the carried h0 as generation uses it)."""
    x, dt, A, Bm, Cm, h0 = (t.detach() for t in ssd_inputs(1, 29, 2, 3, 1, 6, torch.float32, seed=4))
    y, last = ssd_scan(x, dt, A, Bm, Cm, h0, chunk_size=8)
    y1, mid = ssd_scan(x[:, :13], dt[:, :13], A, Bm[:, :13], Cm[:, :13], h0, chunk_size=8)
    y2, last2 = ssd_scan(x[:, 13:], dt[:, 13:], A, Bm[:, 13:], Cm[:, 13:], mid, chunk_size=8)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y, **TOL[torch.float32])
    torch.testing.assert_close(last2, last, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS.get)
def test_triton_resets_match_float64_loop(triton_kernels, dtype):
    """Resets at t = 0 (h0 dropped), at a chunk border (16), just before it (15) and at random inside chunks."""
    inputs = ssd_inputs(2, 37, 2, 3, 1, 5, dtype, seed=8)
    reset = torch.rand(2, 37, generator=torch.Generator().manual_seed(8)) < 0.1
    reset[0, 0] = reset[1, 15] = reset[1, 16] = True
    reset = reset.to(DEVICE)
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=16, reset=reset), inputs)
    _assert_close(got, _grads(lambda *t: ssd_scan_ref(*t, reset=reset), _as64(inputs)), **TOL[dtype])


def test_triton_packed_documents_equal_each_alone(triton_kernels):
    x, dt, A, Bm, Cm = (t.detach() for t in ssd_inputs(1, 30, 2, 3, 1, 4, torch.float32, with_h0=False)[:5])
    reset = torch.zeros(1, 30, dtype=torch.bool, device=DEVICE)
    reset[0, 11] = True  # documents [0, 11) and [11, 30), the border inside the second chunk of 8
    y, last = ssd_scan(x, dt, A, Bm, Cm, chunk_size=8, reset=reset)
    y1, _ = ssd_scan(x[:, :11], dt[:, :11], A, Bm[:, :11], Cm[:, :11], chunk_size=8)
    y2, last2 = ssd_scan(x[:, 11:], dt[:, 11:], A, Bm[:, 11:], Cm[:, 11:], chunk_size=8)
    torch.testing.assert_close(y, torch.cat((y1, y2), 1), **TOL[torch.float32])
    torch.testing.assert_close(last, last2, **TOL[torch.float32])


def test_strided_inputs(triton_kernels):
    """Non-contiguous views (x, B and C split from one projection as Mamba-2 does; a transposed h0) give the
    contiguous inputs' outputs and gradients."""
    x, dt, A, Bm, Cm, h0 = ssd_inputs(1, 19, 2, 3, 2, 4, torch.float32, seed=5)
    want = _grads(lambda *t: ssd_scan(*t, chunk_size=8), [x, dt, A, Bm, Cm, h0])

    def split(xbc, dt, A, h0t):
        xs, bs, cs = xbc.split([6, 8, 8], dim=-1)  # (B, T, 22) -> views with row stride 22
        x_, B_, C_ = xs.view(1, 19, 2, 3), bs.view(1, 19, 2, 4), cs.view(1, 19, 2, 4)
        return ssd_scan(x_, dt, A, B_, C_, h0t.transpose(2, 3), chunk_size=8)

    xbc = torch.cat((x.detach().flatten(2), Bm.detach().flatten(2), Cm.detach().flatten(2)), -1).requires_grad_()
    h0t = h0.detach().transpose(2, 3).contiguous().requires_grad_()  # (B, H, N, P): h0 is its transposed view
    dt_, A_ = dt.detach().requires_grad_(), A.detach().requires_grad_()
    y, last, dxbc, ddt, dA, dh0t = _grads(split, [xbc, dt_, A_, h0t])
    dx, dB, dC = (d.view(1, 19, 2, -1) for d in dxbc.split([6, 8, 8], dim=-1))
    got = [y, last, dx, ddt, dA, dB, dC, dh0t.transpose(2, 3)]
    _assert_close(got, want, **TOL[torch.float32])


def test_dispatch_rule(monkeypatch):
    """auto: Triton only on CUDA tensors; float64 always takes the eager chunked form; resets go to Triton."""
    calls = []
    real = ssd_mod._SSDScan.apply
    monkeypatch.setattr(ssd_mod._SSDScan, "apply", lambda *a: calls.append("triton") or real(*a))
    x, dt, A, Bm, Cm = (t.detach().cpu() for t in ssd_inputs(1, 5, 2, 3, 1, 4, torch.float32, with_h0=False)[:5])
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    ssd_scan(x, dt, A, Bm, Cm)
    assert calls == []
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    ssd_scan(x.double(), dt.double(), A.double(), Bm.double(), Cm.double())
    assert calls == []
    if dispatch.triton_available() and dispatch.interpreter_on():
        ssd_scan(x, dt, A, Bm, Cm)
        ssd_scan(x, dt, A, Bm, Cm, reset=torch.zeros(1, 5, dtype=torch.bool))
        assert calls == ["triton", "triton"]
        # tiles past what fits a GPU block's shared memory: 129 rows (padded to 256), P = 129, or both 65
        long = [t.detach().cpu() for t in ssd_inputs(1, 129, 1, 2, 1, 4, torch.float32, with_h0=False)[:5]]
        ssd_scan(*long, chunk_size=256)
        both = [t.detach().cpu() for t in ssd_inputs(1, 65, 1, 65, 1, 4, torch.float32, with_h0=False)[:5]]
        ssd_scan(*both, chunk_size=128)
        wide = [t.detach().cpu() for t in ssd_inputs(1, 3, 1, 129, 1, 4, torch.float32, with_h0=False)[:5]]
        ssd_scan(*wide)
        assert calls == ["triton", "triton"]


@pytest.mark.slow
def test_opcheck(triton_kernels):
    """Schema, fake tensors and AOT dispatch of both ops (their autograd is _SSDScan, outside the ops)."""
    x, dt, A, Bm, Cm, h0 = (t.detach() for t in ssd_inputs(1, 9, 2, 3, 1, 4, torch.float32, seed=6))
    reset = torch.zeros(1, 9, dtype=torch.bool, device=DEVICE)
    reset[0, 5] = True
    torch.library.opcheck(torch.ops.nanollama.ssd_scan.default, (x, dt, A, Bm, Cm, h0, reset, 4))
    _, last, states = torch.ops.nanollama.ssd_scan(x, dt, A, Bm, Cm, None, None, 4)
    args = (x, dt, A, Bm, Cm, states, None, torch.randn_like(x), torch.randn_like(last), 4)
    torch.library.opcheck(torch.ops.nanollama.ssd_scan_bwd.default, args)


@pytest.mark.slow
def test_compile_has_no_graph_break(triton_kernels):
    x, dt, A, Bm, Cm, h0 = ssd_inputs(1, 11, 2, 3, 1, 4, torch.float32, seed=7)

    def loss(x, dt, A, Bm, Cm, h0):
        y, last = ssd_scan(x, dt, A, Bm, Cm, h0, chunk_size=4)
        return (y * y.flip(1)).sum() + last.square().sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(x, dt, A, Bm, Cm, h0).graph_break_count == 0
    args = (x, dt, A, Bm, Cm, h0)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*args)
    want = loss(*args)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) accepts the kernels for sm_90 at Mamba-2's tiles (L = P = 64,
    N = 128), and each fits an H200 block's shared memory. Needs no GPU (about 20 s here)."""
    stdout = compile_offline("sm90_compile_ssd.py")
    assert "ok" in stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("chunk, P", [(64, 64), (128, 64), (64, 128)])
def test_cuda_model_shapes(monkeypatch, dtype, chunk, P):
    """auto on CUDA runs the kernels at Mamba-2's sizes (N = 128, G = 1 < H = 8, T = 1000 not a multiple of
    the chunk, h0 and resets): every output and gradient within a dtype-sized fraction of its largest entry
    of the float64 eager chunked form on the same inputs."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")
    monkeypatch.delenv("NANOLLAMA_KERNELS", raising=False)
    inputs = ssd_inputs(2, 1000, 8, P, 1, 128, dtype, seed=9)
    reset = torch.rand(2, 1000, generator=torch.Generator().manual_seed(9)) < 0.01
    reset = reset.to(DEVICE)
    calls = []
    real = ssd_mod._SSDScan.apply
    monkeypatch.setattr(ssd_mod._SSDScan, "apply", lambda *a: calls.append(1) or real(*a))
    got = _grads(lambda *t: ssd_scan(*t, chunk_size=chunk, reset=reset), inputs)
    assert calls, "auto did not take the Triton path on CUDA"
    want = _grads(lambda *t: ssd_scan(*t, chunk_size=chunk, reset=reset), _as64(inputs))
    bound = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 5e-5}[dtype]
    names = ["y", "h_last", "dx", "ddt", "dA", "dB", "dC", "dh0"]
    for name, a, b in zip(names, got, want):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err < bound, f"{name}: max error {err:.2e} of the largest entry (bound {bound:.0e})"
