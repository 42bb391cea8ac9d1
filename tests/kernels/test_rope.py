"""RoPE: the Triton op (under the interpreter on the CPU) against a float64 reference, forward and
backward; the scaled frequency tables against their formulas; dispatch, tracing and bad input."""

import json
import math
import warnings

import pytest
import torch
from sm90 import compile_offline

from nanollama.kernels import dispatch
from nanollama.kernels import rope as rope_mod
from nanollama.kernels._triton import pow2_at_least
from nanollama.kernels.rope import apply_rope, check_rope_scaling, rope_frequencies, rope_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as in tests/kernels/conftest.py

# One tolerance table for this module: output and gradients, against float64 on the same inputs.
# fp32: a few roundings of values of size ~4; bf16/fp16: one rounding of the result (2^-8, 2^-11).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}

# (B, S, Hq, Hk, D, layout). layout: "fused" = q, k views of one (B, S, (Hq + 2 Hk) D) projection,
# "heads_first" = transposed views of (B, H, S, D) tensors, "contiguous".
SHAPES = [
    (2, 37, 4, 2, 32, "fused"),
    (1, 37, 6, 2, 64, "heads_first"),
    (2, 37, 2, 2, 128, "contiguous"),
    (1, 5, 2, 1, 48, "fused"),  # D/2 = 24 is not a power of two: masked lanes
]


def _qk(B, S, Hq, Hk, D, layout, dtype, requires_grad=True):
    if layout == "fused":
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=DEVICE).to(dtype)
        q = qkv[..., : Hq * D].view(B, S, Hq, D)  # (B, S, Hq, D), token stride (Hq + 2 Hk) D
        k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, S, Hk, D)
    elif layout == "heads_first":
        q = torch.randn(B, Hq, S, D, device=DEVICE).to(dtype).transpose(1, 2)  # (B, S, Hq, D) view
        k = torch.randn(B, Hk, S, D, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, S, Hq, D, device=DEVICE).to(dtype)
        k = torch.randn(B, S, Hk, D, device=DEVICE).to(dtype)
    if layout != "contiguous":
        assert not q.is_contiguous() and not k.is_contiguous()
    if requires_grad:
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()  # leaves, same strides
    return q, k


def _positions(kind, B, S):
    """(positions, table length) for None / offset (a KV cache at different lengths) / random."""
    if kind is None:
        return None, S + 3
    if kind == "offset":
        offsets = torch.tensor([5, 11][:B], device=DEVICE)
        return offsets[:, None] + torch.arange(S, device=DEVICE)[None, :], S + 11
    table = 3 * S
    return torch.randint(0, table, (B, S), device=DEVICE), table


def _check_against_float64(q, k, cos, sin, positions, interleaved):
    """Forward and backward of apply_rope against rope_ref in float64, shared upstream gradients."""
    tol = TOL[q.dtype]
    q_in, k_in = q.detach().clone(), k.detach().clone()
    q_out, k_out = apply_rope(q, k, cos, sin, positions, interleaved)
    assert q_out.dtype == q.dtype and k_out.dtype == k.dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    c64, s64 = cos.double(), sin.double()
    rq, rk = rope_ref(q64, c64, s64, positions, interleaved), rope_ref(k64, c64, s64, positions, interleaved)
    rdq, rdk = torch.autograd.grad((rq, rk), (q64, k64), (gq.double(), gk.double()))
    for name, got, want in [("q_out", q_out, rq), ("k_out", k_out, rk), ("dq", dq, rdq), ("dk", dk, rdk)]:
        torch.testing.assert_close(got.double(), want.detach(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    # Out of place: the inputs (which autograd may have saved) are untouched.
    assert torch.equal(q.detach(), q_in) and torch.equal(k.detach(), k_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("pos_kind", [None, "offset", "random"], ids=["pos-none", "pos-offset", "pos-random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-Hq{}-Hk{}-D{}-{}".format(*s))
def test_triton_matches_float64(triton_kernels, shape, pos_kind, interleaved, dtype):
    torch.manual_seed(hash((shape, pos_kind, interleaved, str(dtype))) % 2**31)
    B, S, Hq, Hk, D, layout = shape
    q, k = _qk(B, S, Hq, Hk, D, layout, dtype)
    positions, table = _positions(pos_kind, B, S)
    cos, sin = rope_frequencies(table, D, device=DEVICE)
    _check_against_float64(q, k, cos, sin, positions, interleaved)


@pytest.mark.parametrize("blocks", [(1, 2), (4, 1)], ids=["T1-H2", "T4-H1"])
def test_triton_gpu_tiling_under_interpreter(triton_kernels, monkeypatch, blocks):
    """The GPU's small tiles (one token per program, a loop over head blocks) with ragged tails."""
    block_t, block_h = blocks
    real = rope_mod._blocks
    monkeypatch.setattr(rope_mod, "_blocks", lambda n, h, half, dev: (block_t, block_h, real(n, h, half, dev)[2]))
    torch.manual_seed(1)
    q, k = _qk(1, 7, 3, 1, 32, "fused", torch.float32)
    positions, table = _positions("random", 1, 7)
    cos, sin = rope_frequencies(table, 32, device=DEVICE)
    _check_against_float64(q, k, cos, sin, positions, interleaved=False)


def test_fp16_and_scaled_tables(triton_kernels):
    """fp16 in and out; a yarn table (|cos|, |sin| up to its temperature, not 1)."""
    torch.manual_seed(2)
    q, k = _qk(2, 37, 4, 2, 64, "fused", torch.float16)
    cos, sin = rope_frequencies(64, 64, scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16})
    _check_against_float64(q, k, cos.to(DEVICE), sin.to(DEVICE), None, interleaved=True)


def test_reference_path_matches_triton(triton_kernels, monkeypatch):
    """The eager path (what auto picks on the CPU) and the Triton op agree."""
    torch.manual_seed(3)
    q, k = _qk(2, 37, 4, 2, 32, "fused", torch.float32, requires_grad=False)
    cos, sin = rope_frequencies(40, 32, device=DEVICE)
    fast = apply_rope(q, k, cos, sin)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    ref = apply_rope(q, k, cos, sin)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_zero_stride_upstream_gradients(triton_kernels):
    """.sum() hands the backward expanded (stride 0) gradients: read them as they are."""
    torch.manual_seed(9)
    q, k = _qk(2, 37, 4, 2, 32, "fused", torch.float32)
    cos, sin = rope_frequencies(37, 32, device=DEVICE)
    q_out, k_out = apply_rope(q, k, cos, sin, interleaved=True)
    dq, dk = torch.autograd.grad(q_out.sum() + 2 * k_out.sum(), (q, k))
    ones = torch.ones(1, 1, 1, 32, dtype=torch.float64, device=DEVICE)
    c64, s64 = cos.double(), sin.double()
    # The backward of a rotation is the inverse rotation: R(-angle) applied to the upstream gradient.
    torch.testing.assert_close(
        dq.double(), rope_ref(ones.expand(2, 37, 4, 32), c64, -s64, None, True), **TOL[torch.float32]
    )
    torch.testing.assert_close(
        dk.double(), rope_ref(2 * ones.expand(2, 37, 2, 32), c64, -s64, None, True), **TOL[torch.float32]
    )


def test_rotation_preserves_norm_and_relative_angle():
    """What RoPE is for: |Rx| = |x| and <R_m q, R_n k> depends on m - n only."""
    torch.manual_seed(4)
    D = 16
    cos, sin = rope_frequencies(64, D, theta=100.0)
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def at(x, p):
        return rope_ref(x, cos.double(), sin.double(), torch.tensor([[p]]))

    torch.testing.assert_close(at(q, 9).norm(), q.norm())
    torch.testing.assert_close((at(q, 9) * at(k, 4)).sum(), (at(q, 25) * at(k, 20)).sum())


def test_opcheck(triton_kernels):
    """Schema, fake tensor and AOT dispatch of the torch op (its autograd is _Rope, outside the op)."""
    torch.manual_seed(5)
    q, k = _qk(1, 5, 2, 1, 8, "fused", torch.float32, requires_grad=False)
    cos, sin = rope_frequencies(8, 8, device=DEVICE)
    positions = torch.randint(0, 8, (1, 5), device=DEVICE)
    torch.library.opcheck(torch.ops.nanollama.rope.default, (q, k, cos, sin, positions, True, False))


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_compile_has_no_graph_break(monkeypatch, path):
    if path == "triton":
        pytest.importorskip("triton")
        if DEVICE.type == "cpu" and not dispatch.interpreter_on():
            pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("NANOLLAMA_KERNELS", path)
    torch.manual_seed(6)
    q, k = _qk(2, 9, 4, 2, 16, "fused", torch.float32)
    cos, sin = rope_frequencies(16, 16, device=DEVICE)
    positions = torch.randint(0, 16, (2, 9), device=DEVICE)

    def loss(q, k, cos, sin, positions):
        q_out, k_out = apply_rope(q, k, cos, sin, positions)
        return (q_out * q_out.flip(-1)).sum() + (k_out * k_out.roll(1, -1)).sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(q, k, cos, sin, positions).graph_break_count == 0
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, cos, sin, positions)
    dq, dk = torch.autograd.grad(got, (q, k))
    want = loss(q, k, cos, sin, positions)
    rdq, rdk = torch.autograd.grad(want, (q, k))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dq, rdq)
    torch.testing.assert_close(dk, rdk)


# ----------------------------------------------------------------------------- one route
#
# apply_rope's Triton path is one route, eager and traced: _Rope.apply -> the nanollama::rope op,
# forward and backward (the backward is the op with conj flipped).


def _rope_loss_grads(fn, q, k, gq, gk):
    q_out, k_out = fn(q, k)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    return q_out, k_out, dq, dk


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("pos_kind", [None, "random"], ids=["pos-none", "pos-random"])
def test_one_route_through_the_op(triton_kernels, monkeypatch, pos_kind, interleaved):
    """Forward and backward each launch through the op once (conj False, then True); no-grad too."""
    torch.manual_seed(10)
    q, k = _qk(2, 9, 4, 2, 16, "fused", torch.float32)
    positions, table = _positions(pos_kind, 2, 9)
    cos, sin = rope_frequencies(table, 16, device=DEVICE)
    gq, gk = torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE)
    calls = []
    monkeypatch.setattr(rope_mod, "_launch_rope", lambda *a: calls.append(a[-1]) or rope_mod._launch_rope_here(*a))
    q_out, k_out, dq, dk = _rope_loss_grads(
        lambda q, k: apply_rope(q, k, cos, sin, positions, interleaved), q, k, gq, gk
    )
    assert type(q_out.grad_fn).__name__ == "_RopeBackward" and calls == [False, True]
    c64, s64 = cos.double(), sin.double()
    want = rope_ref(gq.double(), c64, -s64, positions, interleaved)  # R^T g
    torch.testing.assert_close(dq.double(), want, **TOL[torch.float32])
    with torch.no_grad():
        again = apply_rope(q, k, cos, sin, positions, interleaved)
    assert torch.equal(again[0], q_out) and torch.equal(again[1], k_out) and calls == [False, True, False]


def test_eager_path_equals_compiled_path(triton_kernels):
    """torch.compile (the traced op inside an aot_eager graph) and the eager route agree exactly."""
    torch.manual_seed(11)
    q, k = _qk(2, 9, 4, 2, 16, "heads_first", torch.float32)
    positions, table = _positions("offset", 2, 9)
    cos, sin = rope_frequencies(table, 16, device=DEVICE)
    gq, gk = torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE)

    def fn(q, k):
        return apply_rope(q, k, cos, sin, positions, True)

    torch._dynamo.reset()
    compiled = _rope_loss_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, gq, gk)
    eager = _rope_loss_grads(fn, q, k, gq, gk)
    for name, a, b in zip(["q_out", "k_out", "dq", "dk"], eager, compiled):
        assert torch.equal(a, b), name


def test_eager_gradients_gradcheck(triton_kernels):
    """Finite differences against _Rope's backward (and, through create_graph, its double
    backward). The op is linear in q and k, so float32 differences with a large step are exact up
    to rounding; a wrong backward (e.g. the forward rotation again) is off by O(1)."""
    torch.manual_seed(12)
    q, k = _qk(1, 5, 2, 1, 8, "fused", torch.float32)
    positions, table = _positions("random", 1, 5)
    cos, sin = rope_frequencies(table, 8, device=DEVICE)

    def fn(q, k):
        return apply_rope(q, k, cos, sin, positions, False)

    kw = dict(eps=1e-2, atol=2e-3, rtol=2e-3, fast_mode=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Input #", UserWarning)  # gradcheck prefers float64 inputs
        assert torch.autograd.gradcheck(fn, (q, k), **kw)
        assert torch.autograd.gradgradcheck(fn, (q, k), **kw)


def test_eager_double_backward_matches_float64(triton_kernels):
    """create_graph=True: the backward is itself differentiable; d/dg <R^T g, v> = R v."""
    torch.manual_seed(13)
    q, k = _qk(2, 7, 4, 2, 16, "fused", torch.float32)
    positions, table = _positions("random", 2, 7)
    cos, sin = rope_frequencies(table, 16, device=DEVICE)
    gq = torch.randn(q.shape, device=DEVICE, requires_grad=True)
    gk = torch.randn(k.shape, device=DEVICE, requires_grad=True)
    vq, vk = torch.randn(q.shape, device=DEVICE), torch.randn(k.shape, device=DEVICE)
    q_out, k_out = apply_rope(q, k, cos, sin, positions)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk), create_graph=True)
    ggq, ggk = torch.autograd.grad((dq * vq).sum() + (dk * vk).sum(), (gq, gk))
    c64, s64 = cos.double(), sin.double()
    torch.testing.assert_close(ggq.double(), rope_ref(vq.double(), c64, s64, positions), **TOL[torch.float32])
    torch.testing.assert_close(ggk.double(), rope_ref(vk.double(), c64, s64, positions), **TOL[torch.float32])


def test_eager_gradient_for_k_only(triton_kernels):
    """Only k requires grad: q's output still comes out right, k's gradient matches float64."""
    torch.manual_seed(14)
    q, k = _qk(1, 6, 2, 2, 16, "contiguous", torch.float32, requires_grad=False)
    k.requires_grad_()
    cos, sin = rope_frequencies(6, 16, device=DEVICE)
    q_out, k_out = apply_rope(q, k, cos, sin)
    gk = torch.randn(k.shape, device=DEVICE)
    (dk,) = torch.autograd.grad(k_out, k, gk)
    c64, s64 = cos.double(), sin.double()
    torch.testing.assert_close(q_out.double(), rope_ref(q.double(), c64, s64), **TOL[torch.float32])
    torch.testing.assert_close(dk.double(), rope_ref(gk.double(), c64, -s64), **TOL[torch.float32])


def test_block_sizes_use_plain_int_powers_of_two():
    """The host-side power-of-two helper agrees with Triton's on every size the launcher sees."""
    triton = pytest.importorskip("triton")
    assert [pow2_at_least(n) for n in range(1, 2049)] == [triton.next_power_of_2(n) for n in range(1, 2049)]
    assert rope_mod._blocks(64, 32, 64, True) == (1, 32, 64)  # a Llama token: all 32 heads x 64 pairs


@pytest.mark.slow
def test_kernel_compiles_for_sm90_with_vector_loads():
    """The real compiler (not the interpreter) accepts the kernel for sm_90, and the loads and
    stores along D are 16-byte vectors in both layouts. Needs no GPU: Triton ships ptxas."""
    stdout = compile_offline("sm90_compile_rope.py")
    for name, ptx in json.loads(stdout.strip().splitlines()[-1]).items():
        assert ptx["v4_loads"] > 0 and ptx["v4_stores"] > 0, (name, ptx)


# ----------------------------------------------------------------------------- dispatch and errors


def test_forcing_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = rope_frequencies(4, 8)
    with pytest.raises(RuntimeError, match="NANOLLAMA_KERNELS=triton but triton is not installed"):
        apply_rope(q, k, cos, sin)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")  # auto falls back to the reference instead
    torch.testing.assert_close(apply_rope(q, k, cos, sin)[0], rope_ref(q, cos, sin))


def test_dispatch_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    assert dispatch.use_triton(cpu) is False
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    assert dispatch.use_triton(cpu) is False  # the CPU always gets the reference under auto
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "interpreter_on", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(cpu)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "fast")
    with pytest.raises(ValueError, match="NANOLLAMA_KERNELS must be one of auto, triton, reference"):
        dispatch.use_triton(cpu)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q and k must be"),
        (lambda a: {**a, "k": a["k"][:, :3]}, "must match q"),
        (lambda a: {**a, "k": a["k"].double()}, "share a dtype"),
        (lambda a: {**a, "cos": a["cos"][:, :3]}, "cos and sin must be"),
        (lambda a: {**a, "cos": a["cos"][:3], "sin": a["sin"][:3]}, "exceeds the rope table"),
        (lambda a: {**a, "positions": torch.zeros(1, 4)}, "positions must be a"),
        (lambda a: {**a, "positions": torch.full((1, 4), 9)}, r"positions must lie in \[0, 8\)"),
    ],
)
def test_bad_input_is_a_clear_error(triton_kernels, change, message):
    if DEVICE.type != "cpu":
        pytest.skip("bad-input checks run on CPU tensors")
    cos, sin = rope_frequencies(8, 8)
    args = dict(q=torch.randn(1, 4, 2, 8), k=torch.randn(1, 4, 1, 8), cos=cos, sin=sin, positions=None)
    with pytest.raises(ValueError, match=message):
        apply_rope(**change(args))


def test_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim must be a positive even integer"):
        rope_frequencies(8, 7)


# ----------------------------------------------------------------------------- scaling tables


def _inv_freq_formula(i: int, D: int, theta: float, scaling: dict | None) -> float:
    """Scalar, branch-by-branch formulas (from the papers' definitions), one dimension at a time."""
    base = theta ** (-2 * i / D)
    if scaling is None:
        return base
    s = scaling["factor"]
    if scaling["type"] == "linear":
        return base / s
    if scaling["type"] == "ntk":
        return (theta * s ** (D / (D - 2))) ** (-2 * i / D)
    L = scaling["original_max_seq_len"]
    if scaling["type"] == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / base
        if wavelen < L / high:
            return base
        if wavelen > L / low:
            return base / s
        smooth = (L / wavelen - low) / (high - low)
        return (1 - smooth) * base / s + smooth * base
    # yarn: the dimension where a frequency makes n turns over the original context bounds the ramp
    turns_dim = lambda n: D * math.log(L / (n * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    lo = max(math.floor(turns_dim(scaling.get("beta_fast", 32.0))), 0)
    hi = min(math.ceil(turns_dim(scaling.get("beta_slow", 1.0))), D - 1)
    hi = hi + 0.001 if hi == lo else hi  # as YaRN's reference and Hugging Face: only when equal
    ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # hi < lo: a reversed ramp, clamped
    return (1 - ramp) * base + ramp * base / s


SCALINGS = [
    None,
    {"type": "linear", "factor": 4.0},
    {"type": "ntk", "factor": 8.0},
    {"type": "yarn", "factor": 4.0, "original_max_seq_len": 4096},
    {"type": "yarn", "factor": 16.0, "original_max_seq_len": 512, "beta_fast": 16.0, "beta_slow": 2.0},
    {"type": "yarn", "factor": 4.0, "original_max_seq_len": 10**40},  # ramp ends cross: high < low
    {"type": "llama3", "factor": 8.0, "original_max_seq_len": 8192},
    {"type": "llama3", "factor": 4.0, "original_max_seq_len": 2048, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "none" if s is None else "-".join(map(str, s.values())))
@pytest.mark.parametrize("D", [64, 128])
def test_scaling_table_matches_formula(scaling, D):
    theta, seq_len = 500000.0 if scaling and scaling["type"] == "llama3" else 10000.0, 300
    cos, sin = rope_frequencies(seq_len, D, theta=theta, scaling=scaling)
    assert cos.shape == sin.shape == (seq_len, D // 2) and cos.dtype == sin.dtype == torch.float32
    if scaling is not None and scaling["type"] == "yarn":
        mscale = 0.1 * math.log(scaling["factor"]) + 1.0
    else:
        mscale = 1.0
    positions = [0, 1, 7, 129, seq_len - 1]
    want_cos = [
        [mscale * math.cos(p * _inv_freq_formula(i, D, theta, scaling)) for i in range(D // 2)] for p in positions
    ]
    want_sin = [
        [mscale * math.sin(p * _inv_freq_formula(i, D, theta, scaling)) for i in range(D // 2)] for p in positions
    ]
    torch.testing.assert_close(cos[positions].double(), torch.tensor(want_cos, dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(sin[positions].double(), torch.tensor(want_sin, dtype=torch.float64), atol=2e-6, rtol=0)


def test_scaling_known_values():
    """Hand-computed anchors: yarn's ramp for D=128, theta=1e4, L=4096 runs over dims 20..46."""
    D, s = 128, 4.0
    cos, sin = rope_frequencies(2, D, scaling={"type": "yarn", "factor": s, "original_max_seq_len": 4096})
    base = 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    angle = torch.atan2(sin[1].double(), cos[1].double())  # position 1: the angle is inv_freq itself
    torch.testing.assert_close(angle[:21], base[:21], rtol=1e-6, atol=0)  # dims <= 20 kept
    torch.testing.assert_close(angle[46:], base[46:] / s, rtol=1e-6, atol=0)  # dims >= 46 interpolated
    assert (angle[21:46] < base[21:46]).all() and (angle[21:46] > base[21:46] / s).all()
    torch.testing.assert_close(
        cos[0].double(), torch.full((D // 2,), 1 + 0.1 * math.log(4), dtype=torch.float64), rtol=1e-7, atol=0
    )
    # linear: position 2 with factor 2 is plain position 1
    lin, plain = rope_frequencies(3, D, scaling={"type": "linear", "factor": 2.0}), rope_frequencies(3, D)
    torch.testing.assert_close(lin[0][2], plain[0][1])


@pytest.mark.parametrize(
    "scaling, message",
    [
        ("yarn", "rope_scaling: must be a mapping"),
        ({"type": "dynamic"}, "rope_scaling.type: must be one of none, linear, ntk, yarn, llama3"),
        ({"type": "linear"}, "rope_scaling.factor: required"),
        ({"type": "linear", "factor": 0.5}, "rope_scaling.factor: must be a number >= 1"),
        ({"type": "linear", "factor": "4"}, "rope_scaling.factor: must be a number"),
        ({"type": "ntk", "factor": 2.0, "alpha": 1}, "rope_scaling.alpha: unknown key for type 'ntk'"),
        ({"type": "yarn", "factor": 2.0}, "rope_scaling.original_max_seq_len: required"),
        ({"type": "yarn", "factor": 2.0, "original_max_seq_len": 1.5}, "original_max_seq_len: must be a positive"),
        ({"type": "yarn", "factor": 2.0, "original_max_seq_len": 64, "beta_fast": 0.5}, "rope_scaling.beta_fast"),
        (
            {"type": "llama3", "factor": 8.0, "original_max_seq_len": 64, "high_freq_factor": 1.0},
            "rope_scaling.high_freq_factor: must be a number > 1",
        ),
        ({"type": "none", "factor": 2.0}, "rope_scaling.factor: unknown key for type 'none'"),
    ],
)
def test_bad_scaling_is_a_clear_error(scaling, message):
    with pytest.raises(ValueError, match=message):
        rope_frequencies(16, 8, scaling=scaling)


def test_scaling_defaults_are_filled():
    assert check_rope_scaling(None) is None and check_rope_scaling({"type": "none"}) is None
    full = check_rope_scaling({"type": "llama3", "factor": 8, "original_max_seq_len": 8192})
    assert full == {"type": "llama3", "factor": 8.0, "original_max_seq_len": 8192, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0}  # fmt: skip


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_bf16_training_shape(monkeypatch, interleaved):
    """The default dispatch on CUDA runs the Triton op: bf16 at a Llama-like shape, fwd + bwd."""
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    calls = []
    launch = rope_mod._launch_rope
    monkeypatch.setattr(rope_mod, "_launch_rope", lambda *a: calls.append(a[-1]) or launch(*a))
    torch.manual_seed(7)
    B, S, Hq, Hk, D = 2, 1031, 32, 8, 128
    q, k = _qk(B, S, Hq, Hk, D, "fused", torch.bfloat16)
    positions = torch.randint(0, 4096, (B, S), device="cuda")
    cos, sin = rope_frequencies(4096, D, theta=500000.0, device="cuda")
    _check_against_float64(q, k, cos, sin, positions, interleaved)
    assert calls == [False, True]  # forward, then the conjugate rotation in the backward


@pytest.mark.gpu
def test_cuda_compile_inductor(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    torch.manual_seed(8)
    q, k = _qk(2, 257, 8, 2, 64, "fused", torch.bfloat16)
    cos, sin = rope_frequencies(257, 64, device="cuda")
    fn = torch.compile(lambda q, k: [t.float().square().sum() for t in apply_rope(q, k, cos, sin)], fullgraph=True)
    got = fn(q, k)
    want = [t.float().square().sum() for t in apply_rope(q, k, cos, sin)]
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_cuda_int64_offsets(monkeypatch):
    """More than 2^31 elements in q: offsets must not overflow int32 (checked on the last tokens)."""
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    B, S, Hq, Hk, D = 1, 2**31 // (16 * 128) + 5, 16, 1, 128
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 64, (B, S), device="cuda")
    cos, sin = rope_frequencies(64, D, device="cuda")
    q_out, k_out = apply_rope(q, k, cos, sin, positions)
    tail = slice(S - 9, S)
    want = rope_ref(q[:, tail].double(), cos.double(), sin.double(), positions[:, tail])
    torch.testing.assert_close(q_out[:, tail].double(), want, **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_cuda_tensors_on_a_device_that_is_not_current(monkeypatch):
    """Triton launches on the current device: the launcher switches to q's device when they differ."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    torch.manual_seed(15)
    q = torch.randn(2, 33, 4, 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 33, 2, 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_frequencies(33, 64, device="cuda:1")
    with torch.cuda.device(0):
        _check_against_float64(q, k, cos, sin, None, interleaved=False)


# ----------------------------------------------------------------------------- issue 13: edges
@pytest.mark.parametrize("bad", [-1, 16], ids=["minus-one", "table-length"])
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_out_of_range_positions_are_one_value_error(monkeypatch, path, bad):
    if path == "triton":
        pytest.importorskip("triton")
        if not dispatch.interpreter_on():
            pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("NANOLLAMA_KERNELS", path)
    q, k = _qk(1, 4, 2, 1, 8, "contiguous", torch.float32)
    cos, sin = rope_frequencies(16, 8, device=DEVICE)
    positions = torch.tensor([[0, 3, bad, 5]], device=DEVICE)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 16\)"):
        apply_rope(q, k, cos, sin, positions)


def test_float64_takes_the_reference_on_every_mode(monkeypatch):
    for mode in ("auto", "triton", "reference"):
        monkeypatch.setenv("NANOLLAMA_KERNELS", mode)
        q, k = _qk(2, 5, 4, 2, 8, "fused", torch.float64)
        cos, sin = rope_frequencies(8, 8, device=DEVICE)
        q_out, k_out = apply_rope(q, k, cos, sin)
        assert q_out.dtype == torch.float64
        torch.testing.assert_close(q_out, rope_ref(q, cos.double(), sin.double()), rtol=1e-12, atol=1e-12)
        (dq,) = torch.autograd.grad(q_out, q, torch.ones_like(q_out))
        assert dq.dtype == torch.float64 and torch.isfinite(dq).all()


def test_yarn_ramp_with_crossed_ends_matches_hugging_face():
    """D=8, theta=1e4, L=1e12: low = floor(9.7) = 9 > high = min(ceil(12.0), 7) = 7. Hugging Face's
    linear_ramp_factor (and YaRN's reference) add 0.001 only when low == high, so here the ramp is
    (i - 9) / (7 - 9) >= 1 for every i < 4 after clamping: every dimension is interpolated (we used to
    set high = low + 0.001, which kept every dimension instead)."""
    D, s = 8, 4.0
    cos, sin = rope_frequencies(2, D, scaling={"type": "yarn", "factor": s, "original_max_seq_len": 10**12})
    base = 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    angle = torch.atan2(sin[1].double(), cos[1].double())
    torch.testing.assert_close(angle, base / s, rtol=1e-6, atol=0)
