"""decode_attention: the Triton split-K kernel (under Triton's interpreter on the CPU) and the eager
reference, both against an independent float64 per-sequence attention."""

import math  # noqa: E402
import os
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from nanollama.kernels import decode as decode_mod  # noqa: E402
from nanollama.kernels.decode import decode_attention, decode_attention_ref  # noqa: E402

# Max abs error against the float64 truth, per dtype (inputs ~N(0,1), outputs are convex mixes of V rows).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        # Fail loudly rather than skip: a skip here would silently drop all Triton coverage on the CPU.
        from nanollama.kernels import _decode_triton

        assert isinstance(_decode_triton._decode_split_kernel, InterpretedFunction), (
            "triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py"
        )


def truth(q, k_cache, v_cache, seqlens, scale=None):
    """Float64, one sequence at a time, K/V explicitly repeated: shares no code with the library."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        L = int(seqlens[b])
        if L == 0:
            continue
        k = k_cache[b, :, :L].double().cpu().repeat_interleave(Hq // Hk, dim=0)  # (Hq, L, D)
        v = v_cache[b, :, :L].double().cpu().repeat_interleave(Hq // Hk, dim=0)
        s = torch.einsum("hd,hld->hl", q[b].double().cpu(), k) * scale
        p = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        out[b] = torch.einsum("hl,hld->hd", p / p.sum(dim=-1, keepdim=True), v)
    return out


def make_inputs(B, Hq, Hk, S_max, D, lengths, dtype, device="cpu", seqlen_dtype=torch.int32, seed=0):
    """Fresh random q and caches; every slot at or after a sequence's length holds NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hk, S_max, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hk, S_max, D, generator=g).to(device, dtype)
    for b, L in enumerate(lengths):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("nan")
    return q, k, v, torch.tensor(lengths, dtype=seqlen_dtype, device=device)


def check(out, q, k, v, L, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - truth(q, k, v, L, scale)).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs error {err:.3g} > {TOL[q.dtype]:.1g}"


# (B, Hq, Hk, S_max, D, lengths): ragged, lengths 1 and S_max, odd S_max, GQA 8/2 and Hq == Hk.
SHAPES = [
    (3, 8, 2, 37, 32, [1, 37, 20]),
    (2, 4, 4, 100, 16, [100, 63]),
    (4, 2, 1, 37, 24, [36, 1, 17, 37]),  # MQA, head dim not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-Hq{s[1]}-Hk{s[2]}-S{s[3]}-D{s[4]}")
def test_triton_matches_float64(triton_path, shape, dtype):
    B, Hq, Hk, S, D, lengths = shape
    q, k, v, L = make_inputs(B, Hq, Hk, S, D, lengths, dtype)
    check(decode_attention(q, k, v, L), q, k, v, L)


@pytest.mark.parametrize("split_size", [16, 32, 48, 128])
def test_triton_split_sizes(triton_path, split_size):
    # 48 is not a power of two (blocks of 16); 128 > S_max means one split per sequence.
    q, k, v, L = make_inputs(3, 8, 2, 100, 16, [100, 1, 49], torch.float32, seed=split_size)
    check(decode_attention(q, k, v, L, split_size=split_size), q, k, v, L)


def test_triton_many_splits(triton_path):
    # More splits than the reduction merges at once (32): exercises its running rescale across chunks.
    q, k, v, L = make_inputs(2, 2, 1, 600, 16, [600, 530], torch.float32, seed=7)
    # Keys aligned with both query heads in the last splits: the running max moves in the last chunk.
    k[:, 0, 512:530] += q.sum(dim=1, keepdim=True)
    check(decode_attention(q, k, v, L, split_size=16), q, k, v, L)


def test_triton_int64_lengths_and_scale(triton_path):
    q, k, v, L = make_inputs(2, 4, 2, 37, 16, [37, 5], torch.float32, seqlen_dtype=torch.int64)
    check(decode_attention(q, k, v, L, scale=0.3), q, k, v, L, scale=0.3)


def test_triton_strided_views(triton_path):
    # A (B, S_max, Hk, D) cache seen as (B, Hk, S_max, D), a slice of a longer allocation, and a
    # non-contiguous q: the kernel takes any strides, no copies.
    B, Hq, Hk, S, D = 2, 4, 2, 37, 16
    _, _, _, L = make_inputs(B, Hq, Hk, S, D, [30, 37], torch.float32)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, S + 11, Hk, D, generator=g).transpose(1, 2)[:, :, :S]
    v = torch.randn(B, S + 11, Hk, D, generator=g).transpose(1, 2)[:, :, :S]
    k[0, :, 30:] = float("nan")
    v[0, :, 30:] = float("nan")
    q = torch.randn(B, D, Hq, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check(decode_attention(q, k, v, L), q, k, v, L)


def test_triton_clamps_lengths_past_s_max_and_below_zero(triton_path):
    # Checking values would sync the host, so the Triton path's documented contract clamps.
    q, k, v, L = make_inputs(3, 4, 2, 37, 16, [37, 37, 0], torch.float32)
    out = decode_attention(q, k, v, torch.tensor([37 + 5, 1000, -3], dtype=torch.int32))
    check(out, q, k, v, L)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("bad", [38, -1], ids=["past-s-max", "negative"])
def test_reference_refuses_lengths_outside_the_cache(monkeypatch, bad):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    q, k, v, _ = make_inputs(2, 4, 2, 37, 16, [37, 37], torch.float32)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, S_max = 37\]"):
        decode_attention(q, k, v, torch.tensor([5, bad]))


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_nan_in_q_or_a_visible_slot_propagates(monkeypatch, mode):
    """As in every other backend: NaN in, NaN out (only rows with no visible key give zeros)."""
    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("NANOLLAMA_KERNELS", mode)
    q, k, v, L = make_inputs(3, 4, 2, 40, 16, [30, 40, 0], torch.float32)
    q[0, 0, 3] = float("nan")  # sequence 0, query head 0
    k[1, 1, 7, 2] = float("nan")  # sequence 1, kv head 1 (query heads 2, 3), a visible slot
    k[0, 0, 35, 0] = float("nan")  # past sequence 0's length: never read
    out = decode_attention(q, k, v, L)
    assert out[0, 0].isnan().all() and out[1, 2:].isnan().all()
    assert torch.isfinite(out[0, 1:]).all() and torch.isfinite(out[1, :2]).all() and (out[2] == 0).all()


def test_triton_empty_sequence_gives_zeros(triton_path):
    q, k, v, L = make_inputs(2, 4, 2, 37, 16, [0, 9], torch.float32)
    out = decode_attention(q, k, v, L, split_size=16)
    assert (out[0] == 0).all()
    check(out, q, k, v, L)


def test_triton_path_really_runs(triton_path, monkeypatch):
    calls = []
    real = decode_mod.decode_attention_launch
    monkeypatch.setattr(decode_mod, "decode_attention_launch", lambda *a: calls.append(1) or real(*a))
    q, k, v, L = make_inputs(1, 2, 1, 20, 16, [20], torch.float32)
    decode_attention(q, k, v, L)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")  # CPU tensors under auto: the reference
    decode_attention(q, k, v, L)
    assert calls == [1]


def test_triton_under_torch_compile(triton_path):
    # The custom op must trace without graph breaks (fake impl, schema); aot_eager avoids a C++ compile.
    torch._dynamo.reset()
    q, k, v, L = make_inputs(2, 8, 2, 37, 16, [3, 37], torch.float32)
    compiled = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")
    check(compiled(q, k, v, L), q, k, v, L)


def test_one_route_through_the_op_eager_and_traced(triton_path, monkeypatch):
    # decode_attention's Triton path always goes through the torch op, eager and traced alike.
    q, k, v, L = make_inputs(3, 8, 2, 37, 16, [1, 37, 20], torch.float32, seed=3)
    with monkeypatch.context() as m:
        op_calls = []
        real_op = decode_mod._decode_attention_op
        m.setattr(decode_mod, "_decode_attention_op", lambda *a: op_calls.append(1) or real_op(*a))
        eager = decode_attention(q, k, v, L, split_size=16)
        assert op_calls == [1]
    torch._dynamo.reset()
    traced = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")(q, k, v, L, split_size=16)
    assert torch.equal(eager, traced)
    assert torch.equal(eager, decode_mod._decode_attention_op(q, k, v, L, 1 / math.sqrt(16), 16))
    check(eager, q, k, v, L)


class _GridSpy:
    """Wraps a kernel object, recording each launch grid and delegating the launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_tuning_edits_reach_the_cached_launch_plan(triton_path, monkeypatch):
    # The split arithmetic is cached; TUNING's values are part of the key, so a sweep's edits apply.
    from nanollama.kernels import _decode_triton

    spy = _GridSpy(_decode_triton._decode_split_kernel)
    monkeypatch.setattr(_decode_triton, "_decode_split_kernel", spy)
    q, k, v, L = make_inputs(1, 2, 1, 256, 16, [256], torch.float32, seed=4)
    first = decode_attention(q, k, v, L)
    monkeypatch.setitem(decode_mod.TUNING, "min_split", 64)
    monkeypatch.setitem(decode_mod.TUNING, "max_split", 64)
    second = decode_attention(q, k, v, L)
    assert spy.grids == [(1, 1), (1, 4)]  # min_split 256 -> one split; max_split 64 -> 256 / 64 = 4
    check(first, q, k, v, L)
    check(second, q, k, v, L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-Hq{s[1]}-Hk{s[2]}-S{s[3]}-D{s[4]}")
def test_reference_on_cpu(monkeypatch, shape, dtype):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    B, Hq, Hk, S, D, lengths = shape
    q, k, v, L = make_inputs(B, Hq, Hk, S, D, lengths, dtype)
    if dtype == torch.float64:  # the reference in float64 is exact up to rounding
        out = decode_attention_ref(q, k, v, L)
        assert (out - truth(q, k, v, L)).abs().max() < 1e-12
    else:
        check(decode_attention(q, k, v, L), q, k, v, L)


def test_reference_empty_sequence_and_compile(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    torch._dynamo.reset()
    q, k, v, L = make_inputs(2, 4, 2, 37, 16, [0, 9], torch.float32)
    out = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")(q, k, v, L)
    assert (out[0] == 0).all()
    check(out, q, k, v, L)


BAD = [
    (dict(q=torch.zeros(2, 4, 1, 16)), "q must be"),
    (dict(k=torch.zeros(2, 2, 37)), "k_cache must be"),
    (dict(v=torch.zeros(2, 2, 36, 16)), "v_cache shape"),
    (dict(q=torch.zeros(3, 4, 16)), "batch"),
    (dict(q=torch.zeros(2, 4, 8)), "head dim"),
    (dict(q=torch.zeros(2, 3, 16)), "multiple of k_cache heads"),
    (dict(L=torch.tensor([1, 2, 3])), "cache_seqlens must have shape"),
    (dict(L=torch.tensor([1.0, 2.0])), "int32 or int64"),
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.float16)), "dtype"),
    (dict(split_size=24), "split_size"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_name_the_argument(bad, message):
    q, k, v, L = torch.zeros(2, 4, 16), torch.zeros(2, 2, 37, 16), torch.zeros(2, 2, 37, 16), torch.tensor([1, 2])
    args = dict(q=q, k=k, v=v, L=L, split_size=None) | bad
    with pytest.raises(ValueError, match=message):
        decode_attention(args["q"], args["k"], args["v"], args["L"], split_size=args["split_size"])


# Compiles both kernels for an H100/H200 (sm_90) through ptxas, with the JIT's specialisations (unit
# strides as constants, 16-divisible pointers and strides). The interpreter never lowers the kernels,
# so this is what catches a bf16 tl.dot or layout error on a machine without a GPU. A subprocess,
# because this module's kernels were built for the interpreter.
_AOT = textwrap.dedent(
    """
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        raise SystemExit(3)
    from nanollama.kernels import _decode_triton as m

    def compile_(fn, types, consts):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            else:
                sig[name] = types.get(name, "i32")
                if name != "qk_scale_log2":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        except TypeError:  # another Triton's private API: nothing to check here
            raise SystemExit(3)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        assert "ld.global" in kernel.asm["ptx"] and kernel.asm["cubin"]

    units = {n: 1 for n in m._decode_split_kernel.arg_names if n.endswith("_d") or n == "stride_seqlens_b"}
    io = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "SEQLENS": "*i32", "OPART": "*fp32", "LSE": "*fp32"}
    consts = dict(HK=8, GROUP=4, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, DOT_PRECISION="tf32")
    compile_(m._decode_split_kernel, {**io, "qk_scale_log2": "fp32"}, {**consts, **units})
    units = {n: 1 for n in m._decode_reduce_kernel.arg_names if n.endswith("_d") or n == "stride_seqlens_b"}
    io = {"OPART": "*fp32", "LSE": "*fp32", "SEQLENS": "*i64", "OUT": "*bf16"}
    compile_(m._decode_reduce_kernel, io, dict(HQ=32, HEAD_DIM=128, BLOCK_S=32, BLOCK_D=128, **units))
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOLLAMA_KERNELS")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: nanollama/
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip("this Triton has no ASTSource/GPUTarget API to compile ahead of time")
    assert run.returncode == 0, run.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at realistic sizes, CUDA graph replay with new lengths
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,D", [(32, 8, 128), (16, 16, 64), (8, 1, 256)])
def test_gpu_bf16_ragged(Hq, Hk, D):
    g = torch.Generator().manual_seed(Hq + D)
    lengths = torch.randint(1, 4097, (16,), generator=g).tolist() + [1, 4096]
    q, k, v, L = make_inputs(len(lengths), Hq, Hk, 4096, D, lengths, torch.bfloat16, device="cuda")
    check(decode_attention(q, k, v, L), q, k, v, L)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_lengths():
    # Lengths live on the device and the launch depends only on shapes: one captured graph serves
    # every decode step.
    q, k, v, L = make_inputs(4, 8, 2, 1024, 64, [1024] * 4, torch.float16, device="cuda")
    L.copy_(torch.tensor([5, 1024, 1, 300], dtype=L.dtype))
    decode_attention(q, k, v, L)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, L)
    for lengths in ([5, 1024, 1, 300], [700, 2, 1023, 64]):
        L.copy_(torch.tensor(lengths, dtype=L.dtype))
        graph.replay()
        torch.cuda.synchronize()
        check(out, q, k, v, L)


@pytest.mark.gpu
def test_gpu_compiled_reduce_overhead_no_recompile():
    # What generate() needs: a compiled decode step under CUDA graphs, lengths changing every step,
    # traced once.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v, L = make_inputs(4, 8, 2, 512, 64, [512] * 4, torch.bfloat16, device="cuda")
    step = torch.compile(decode_attention, fullgraph=True, mode="reduce-overhead")
    for lengths in ([1, 512, 77, 300], [2, 511, 78, 301], [3, 100, 79, 302], [4, 5, 80, 303]):
        L = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        out = step(q, k, v, L).clone()  # clone: cudagraph outputs are overwritten by the next replay
        check(out, q, k, v, L)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
def test_gpu_tensors_on_a_device_that_is_not_current():
    # Triton launches on the current device: the launcher switches to q's device when they differ.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v, L = make_inputs(2, 8, 2, 300, 64, [300, 17], torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        out = decode_attention(q, k, v, L)
    assert out.device == q.device
    check(out, q, k, v, L)
