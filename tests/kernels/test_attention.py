"""attention(): every backend on this machine against a float64 dense reference, forward and backward;
fully masked rows; zero recompiles of compiled flex across batches; the measured auto choice and its cache."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from nanollama.kernels import attention_backends, dispatch, masks
from nanollama.kernels.attention import PreparedMask, attention, attention_ref, flash_available, prepare

B, D = 2, 16
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SHAPES = [  # (Sq, Skv, Hq, Hk)
    (70, 70, 4, 2),  # odd length, GQA
    (129, 129, 2, 2),  # one past a block
    (70, 129, 4, 1),  # Sq < Skv (queries are the last positions), multi-query
]


def ref64(q, k, v, mask, scale=None):
    """float64 attention from the mask's dense boolean; rows with no visible key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    Hq, Hk, Sq, Skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(Hq // Hk, dim=1), v.repeat_interleave(Hq // Hk, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        allowed = mask.dense(q.shape[0], Sq, Skv, q.device)[:, None]
        weights = torch.where(allowed, torch.exp(scores - scores.amax(-1, keepdim=True)), 0.0)
        total = weights.sum(-1, keepdim=True)
        probs = weights / torch.where(total > 0, total, 1.0)
    else:
        probs = torch.softmax(scores, -1)
    return probs @ v


def _mask_cases(kv_len: int) -> dict:
    g = torch.Generator().manual_seed(1000 + kv_len)
    prefix = torch.randint(0, kv_len, (B,), generator=g)
    ids = torch.sort(torch.randint(0, 4, (B, kv_len), generator=g), dim=1).values
    lengths = torch.tensor([0, kv_len // 2])  # sequence 0 sees nothing: every row fully masked
    return {
        "none": None,
        "causal": masks.causal(),
        "prefix_lm": masks.prefix_lm(prefix),
        "document": masks.document(ids),
        "sliding_window": masks.sliding_window(17),
        "padding": masks.padding(lengths),
        "causal&padding": masks.causal() & masks.padding(lengths),
        "document&sliding": masks.document(ids) & masks.sliding_window(17),
        "sliding|prefix": masks.sliding_window(5) | masks.prefix_lm(prefix),
    }


MASKS = list(_mask_cases(8))


def _inputs(Sq, Skv, Hq, Hk, dtype, device="cpu", seed=0):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) storage, the layout the model produces."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(B, Skv, Hk, D, generator=g, device=device).to(dtype).transpose(1, 2)
    v = torch.randn(B, Skv, Hk, D, generator=g, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def _check(backend, Sq, Skv, Hq, Hk, mask_name, dtype, device="cpu", grad=True):
    mask = _mask_cases(Skv)[mask_name]
    q, k, v = _inputs(Sq, Skv, Hq, Hk, dtype, device)
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    expected_leaves = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    expected = ref64(*expected_leaves, mask)
    with torch.set_grad_enabled(grad):
        out = attention(*leaves, mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    if mask is not None:  # rows with no visible key are exactly zero
        empty = ~mask.dense(B, Sq, Skv, device).any(-1)  # (B, Sq)
        assert (out.detach().float().abs().sum(-1).transpose(0, 1)[:, empty] == 0).all()
    if not grad:
        return
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device)
    (out.float() * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()
    for name, got, want in zip("qkv", leaves, expected_leaves):
        assert torch.isfinite(got.grad).all(), f"d{name} has NaN/inf"
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")
    if mask is not None and empty.any():
        assert (leaves[0].grad.transpose(1, 2)[empty] == 0).all()  # zero gradient into empty rows


@pytest.mark.parametrize("backend", ["reference", "sdpa"])  # flex: below; flash and flex backward: gpu tests
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("Sq,Skv,Hq,Hk", SHAPES)
def test_matches_float64_reference(backend, mask_name, Sq, Skv, Hq, Hk):
    _check(backend, Sq, Skv, Hq, Hk, mask_name, torch.float32)


# flex on the CPU: forward only (PyTorch has no CPU backward), and eager flex traces each new mask
# and shape (seconds each on 2 cores): every mask at the shape with Sq != Skv and GQA, plus two at 129
@pytest.mark.parametrize(
    "mask_name,Sq,Skv,Hq,Hk",
    [(name, 70, 129, 4, 1) for name in MASKS] + [("document", 129, 129, 2, 2), ("causal&padding", 129, 129, 2, 2)],
)
def test_flex_forward_matches_float64_reference(mask_name, Sq, Skv, Hq, Hk):
    _check("flex", Sq, Skv, Hq, Hk, mask_name, torch.float32, grad=False)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("mask_name", ["causal", "document", "causal&padding"])
def test_bfloat16(backend, mask_name):
    _check(backend, 129, 129, 4, 2, mask_name, torch.bfloat16)


def test_more_queries_than_keys_gives_empty_rows():
    # Sq > Skv: the first queries sit before key 0 under a causal mask and see nothing
    for backend in ("reference", "sdpa"):
        mask = masks.causal()
        q, k, v = (t.detach().requires_grad_() for t in _inputs(9, 5, 2, 2, torch.float32))
        out = attention(q, k, v, mask=mask, backend=backend)
        torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
        assert (out[:, :, :4] == 0).all() and (out[:, :, 4:] != 0).any()
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and (q.grad[:, :, :4] == 0).all()


def test_scale_and_reference_function():
    q, k, v = _inputs(33, 33, 2, 1, torch.float32)
    mask = masks.prefix_lm(torch.tensor([4, 20]))
    want = ref64(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(attention_ref(q, k, v, mask, scale=0.3).double(), want, **TOL[torch.float32])
    torch.testing.assert_close(attention(q, k, v, mask, 0.3, backend="sdpa").double(), want, **TOL[torch.float32])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda q, k, v: attention(q[0], k, v), "q must be a 4-D tensor"),
        (lambda q, k, v: attention(q, k, v[:, :, :3]), "k .* and v .* must have the same shape"),
        (lambda q, k, v: attention(q[:, :3], k, v), "multiple of key/value heads"),
        (lambda q, k, v: attention(q, k, v, backend="fast"), "backend must be one of auto, flex, sdpa"),
        (lambda q, k, v: attention(q, k, v, mask="causal"), "mask must be a Mask, a PreparedMask or None"),
        (lambda q, k, v: attention(q, k, v, mask=masks.padding(torch.tensor([1]))), "padding: holds 1 sequences"),
    ],
)
def test_bad_input(call, message):
    q, k, v = _inputs(8, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_unsupported_backends_say_why(monkeypatch):
    q, k, v = (t.detach().requires_grad_() for t in _inputs(8, 8, 2, 2, torch.float32))
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        attention(q, k, v, mask=masks.causal(), backend="flex")
    with pytest.raises(RuntimeError, match="attention backend 'flash': flash-attn (is not installed|runs on CUDA)"):
        attention(q, k, v, mask=masks.causal(), backend="flash")
    monkeypatch.setenv("NANOLLAMA_FLEX_COMPILE", "yes")
    with torch.no_grad(), pytest.raises(ValueError, match="NANOLLAMA_FLEX_COMPILE must be auto, 0 or 1"):
        attention(q, k, v, backend="flex")


@pytest.mark.parametrize(
    "device,compiler",
    [
        ("cpu", "eager"),
        pytest.param("cpu", "inductor", marks=pytest.mark.slow),
        pytest.param("cuda", "inductor", marks=pytest.mark.gpu),
    ],
)
def test_compiled_flex_never_recompiles(monkeypatch, device, compiler):
    """New prefix lengths and document boundaries each batch (new prepared masks): zero recompiles.

    Recompiles are Dynamo guard failures, the same whatever backend compiles the graph, so Dynamo's
    eager backend checks them in ~2 s; inductor (~30 s on 2 CPU cores) is the slow variant. One
    compilation covers both kinds of per-sequence tensor: the mask combines them. Forward only on
    the CPU (no flex backward there), forward and backward on CUDA.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("NANOLLAMA_FLEX_COMPILE", "1")
    monkeypatch.setattr(attention_backends, "_FLEX_BACKEND", compiler)
    monkeypatch.setattr(attention_backends, "_COMPILED_FLEX", None)
    S, H = 256, 2
    grad = device == "cuda"
    g = torch.Generator().manual_seed(3)

    def batch():
        ids = torch.sort(torch.randint(0, 6, (B, S), generator=g), dim=1).values.to(device)
        mask = masks.document(ids) | masks.prefix_lm(torch.randint(0, S, (B,), generator=g).to(device))
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(device).requires_grad_(grad) for _ in range(3))
        return q, k, v, mask

    def step(q, k, v, mask):
        out = attention(q, k, v, mask=mask)
        if grad:
            out.sum().backward()
        return out

    with torch.set_grad_enabled(grad):
        q, k, v, mask = batch()
        step(q, k, v, prepare(mask, q.shape, k.shape, q.dtype, q.device, grad, backend="flex"))  # the one compilation
        frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
        for _ in range(3):
            q, k, v, mask = batch()
            prepared = prepare(mask, q.shape, k.shape, q.dtype, q.device, grad, backend="flex")
            for _layer in range(2):  # layers share the forward's prepared mask
                out = step(q, k, v, prepared)
            torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch compiled a new graph"
    assert counters["frames"]["total"] == frames, "a new batch re-entered dynamo compilation"
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_traces_in_one_graph_under_torch_compile():
    """A model compiled whole: a fresh document mask per batch, no graph break (fullgraph), no recompile."""
    from torch._dynamo.utils import counters

    S, H = 64, 2
    g = torch.Generator().manual_seed(5)

    def layer(q, k, v, mask):
        return attention(q * 1.0, k, v, mask=mask)

    compiled = torch.compile(layer, fullgraph=True)
    graphs = None
    for _ in range(3):
        mask = masks.document(torch.sort(torch.randint(0, 4, (B, S), generator=g), dim=1).values)
        for _layer in range(2):  # the first layer builds the dense mask, the second finds it cached
            q, k, v = (torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3))
            out = compiled(q, k, v, mask)
            out.sum().backward()
            torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
            assert torch.isfinite(q.grad).all()
        graphs = counters["stats"]["unique_graphs"] if graphs is None else graphs  # after the first batch
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch recompiled"


# -- auto: measured choice, memory and disk caches, override --------------------------------------
@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLAMA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOLLAMA_ATTENTION", raising=False)
    dispatch.clear_memory_cache()
    dispatch.STATS.clear()
    yield tmp_path
    dispatch.clear_memory_cache()


def _choose(q, k, mask):
    grad = torch.is_grad_enabled() and q.requires_grad
    return dispatch.choose_backend(mask, q.shape, k.shape, q.dtype, q.device, grad)


def _grad_inputs():
    return [t.detach().requires_grad_() for t in _inputs(70, 70, 4, 2, torch.float32)]


def test_auto_measures_once_then_uses_memory_then_disk(fresh_cache, caplog):
    mask = masks.document(torch.sort(torch.randint(0, 3, (B, 70)), dim=1).values)
    q, k, v = _grad_inputs()
    with caplog.at_level(logging.INFO, logger="nanollama.kernels.attention"):
        out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
    assert dispatch.STATS["measured"] == 1
    assert "attention auto: document|q128|kv128|d16|g2|float32|fwd+bwd ->" in caplog.text
    files = list(fresh_cache.glob("attention-*.json"))
    assert len(files) == 1 and "torch" in files[0].name
    data = json.loads(files[0].read_text())
    entry = data["choices"]["document|q128|kv128|d16|g2|float32|fwd+bwd"]
    # on the CPU with gradients, flex is never a candidate
    assert entry["backend"] in ("sdpa", "reference") and set(entry["ms"]) == {"sdpa", "reference"}
    assert data["torch"] == torch.__version__

    attention(q, k, v, mask=mask)  # same key (another layer): memory
    q2, k2, v2 = [t.detach()[:, :, :65].requires_grad_() for t in _grad_inputs()]  # same bucket
    attention(q2, k2, v2, mask=masks.document(torch.zeros(B, 65, dtype=torch.long)))
    assert dispatch.STATS["measured"] == 1 and dispatch.STATS["memory_hits"] == 2

    dispatch.clear_memory_cache()  # a new process: the file answers
    attention(q, k, v, mask=mask)
    assert dispatch.STATS["measured"] == 1 and dispatch.STATS["disk_hits"] == 1

    with torch.no_grad():  # forward-only is another key
        attention(q, k, v, mask=mask)
    assert dispatch.STATS["measured"] == 2
    assert len(json.loads(files[0].read_text())["choices"]) == 2


def test_auto_follows_the_cached_choice(fresh_cache, monkeypatch):
    q, k, v = _grad_inputs()
    mask = masks.causal()
    key = dispatch.selection_key(mask, q.shape, k.shape, q.dtype, grad=True)
    path = dispatch.cache_file(q.device)
    path.write_text(json.dumps({"choices": {key: {"backend": "reference", "ms": {}}}}))
    assert _choose(q, k, mask) == "reference"
    assert dispatch.STATS["measured"] == 0
    # an entry naming a backend that cannot run here is ignored and measured again
    dispatch.clear_memory_cache()
    path.write_text(json.dumps({"choices": {key: {"backend": "flex", "ms": {}}}}))
    assert _choose(q, k, mask) in ("sdpa", "reference")
    assert dispatch.STATS["measured"] == 1
    # a corrupt file is measured over, never a crash
    dispatch.clear_memory_cache()
    path.write_text("{not json")
    assert _choose(q, k, mask) in ("sdpa", "reference")
    assert json.loads(path.read_text())["choices"][key]["backend"] in ("sdpa", "reference")


def test_override_and_cache_dir(fresh_cache, monkeypatch):
    q, k, v = _grad_inputs()
    monkeypatch.setenv("NANOLLAMA_ATTENTION", "reference")
    assert _choose(q, k, masks.causal()) == "reference"
    monkeypatch.setenv("NANOLLAMA_ATTENTION", "flex")
    with pytest.raises(RuntimeError, match="NANOLLAMA_ATTENTION=flex cannot run this call: flex has no backward"):
        attention(q, k, v, mask=masks.causal())
    with torch.no_grad():  # forward-only flex on the CPU is allowed when forced
        assert _choose(q, k, masks.causal()) == "flex"
    monkeypatch.setenv("NANOLLAMA_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="NANOLLAMA_ATTENTION must be one of auto, flex"):
        attention(q, k, v)
    assert dispatch.STATS["measured"] == 0 and not list(fresh_cache.iterdir())

    monkeypatch.delenv("NANOLLAMA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh_cache / "xdg"))
    assert dispatch.cache_dir() == fresh_cache / "xdg" / "nanollama"


# -- GPU: compiled flex forward and backward in bf16, flash, auto ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "mask_name,Sq,Skv,Hq,Hk",  # each mask compiles flex once (fwd and bwd): few shapes
    [(name, 129, 129, 4, 2) for name in ("causal", "prefix_lm", "document", "sliding_window", "causal&padding")]
    + [("document", 70, 129, 4, 1), ("causal&padding", 256, 256, 2, 2)],
)
def test_gpu_flex_compiled_bf16(mask_name, Sq, Skv, Hq, Hk):
    _check("flex", Sq, Skv, Hq, Hk, mask_name, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "reference", "flash"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "sliding_window", "document", "causal&padding"])
def test_gpu_other_backends_bf16(backend, mask_name):
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    if backend == "flash" and mask_name == "causal&padding":
        pytest.skip("flash-attn has no such mask")
    _check(backend, 256, 256, 4, 2, mask_name, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_gpu_auto_picks_and_caches(fresh_cache):
    q, k, v = (t.detach().requires_grad_() for t in _inputs(1024, 1024, 4, 2, torch.bfloat16, device="cuda"))
    mask = masks.prefix_lm(torch.tensor([256, 700], device="cuda"))
    out = attention(q, k, v, mask=mask)
    out.float().sum().backward()
    assert dispatch.STATS["measured"] == 1 and torch.isfinite(q.grad).all()
    entry = next(iter(json.loads(next(fresh_cache.glob("*.json")).read_text())["choices"].values()))
    assert "flex" in entry["ms"] and "sdpa" in entry["ms"]


def test_auto_measures_correctly_inside_an_activation_checkpointed_block(fresh_cache):
    """The first (measuring) call may come from inside torch.utils.checkpoint, forward and recompute."""
    q, k, v = (t.requires_grad_() for t in _grad_inputs())
    mask = masks.causal()

    def block(q, k, v):
        return attention(q, k, v, mask=mask).sin()

    out = torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False)
    out.sum().backward()
    assert dispatch.STATS["measured"] == 1
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref64(q2, k2, v2, mask).sin().sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


def test_compiled_flex_keeps_compiling_past_dynamo_default_limit(monkeypatch):
    """Training and evaluation at several lengths need more than Dynamo's default 8 entries for the one
    compiled flex_attention: each new (mask kind, length) must still compile, not fall back to eager flex.
    Dynamo's eager backend stands in for inductor (same caching and limits, no code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("NANOLLAMA_FLEX_COMPILE", "1")
    monkeypatch.setattr(attention_backends, "_FLEX_BACKEND", "eager")
    monkeypatch.setattr(attention_backends, "_COMPILED_FLEX", None)
    torch._dynamo.reset()
    try:
        compiled = counters["frames"]["ok"]
        kinds = [
            masks.causal(),
            masks.sliding_window(5),
            masks.prefix_lm(torch.tensor([3])),
            masks.padding(torch.tensor([9])),
        ]
        cases = [(kind, S) for S in (16, 24, 32) for kind in kinds]  # 12 cache entries
        with torch.no_grad():
            for mask, S in cases:
                q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
                out = attention(q, k, v, mask=mask, backend="flex")
                torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
        # one successful Dynamo compilation per case; past the limit a case is not compiled but falls back
        assert counters["frames"]["ok"] - compiled == len(cases), "a case ran uncompiled (Dynamo's recompile limit)"
    finally:
        torch._dynamo.reset()


# -- prepare: once per forward, reused by every layer ---------------------------------------------
def test_prepared_mask_is_built_once_and_checked(monkeypatch):
    calls = []
    real = attention_backends.block_masks.build_block_mask
    monkeypatch.setattr(attention_backends.block_masks, "build_block_mask", lambda *a: calls.append(1) or real(*a))
    q, k, v = _inputs(70, 70, 4, 2, torch.float32)
    mask = masks.document(torch.sort(torch.randint(0, 3, (B, 70)), dim=1).values)
    prepared = prepare(mask, q.shape, k.shape, q.dtype, q.device, False, backend="flex")
    assert isinstance(prepared, PreparedMask) and prepared.backend == "flex" and len(calls) == 1
    with torch.no_grad():
        for _layer in range(3):
            out = attention(q, k, v, mask=prepared)
            torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
    assert len(calls) == 1  # the layers reused the BlockMask
    with pytest.raises(ValueError, match=r"mask was prepared for \(B, Sq, Skv\) = \(2, 70, 70\)"):
        attention(q[:, :, :65], k[:, :, :65], v[:, :, :65], mask=prepared)
    with pytest.raises(ValueError, match="backend 'sdpa' differs from the prepared mask's 'flex'"):
        attention(q, k, v, mask=prepared, backend="sdpa")
    with pytest.raises(ValueError, match="prepare: mask must be a nanollama.kernels.masks.Mask"):
        prepare(prepared, q.shape, k.shape, q.dtype, q.device, False)


# -- issue 13: bad inputs, non-finite inputs, scale=0 ---------------------------------------------
def test_zero_kv_heads_and_integer_tensors_are_value_errors():
    q = torch.randn(1, 2, 4, 8)
    empty = torch.randn(1, 0, 4, 8)
    with pytest.raises(ValueError, match=r"must be a multiple of key/value heads \(0\)"):
        attention(q, empty, empty)
    ints = torch.ones(1, 2, 4, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="q, k, v must be float16/bfloat16/float32/float64, got torch.int64"):
        attention(ints, ints, ints)


NONFINITE_MASKS = {
    "none": lambda: None,
    "causal": masks.causal,
    "prefix_lm": lambda: masks.prefix_lm(torch.tensor([3, 6])),
    "padding": lambda: masks.padding(torch.tensor([5, 8])),
}


@pytest.mark.parametrize("mask_name", NONFINITE_MASKS)
def test_backends_agree_on_nan_queries_and_zero_scale(mask_name):
    mask = NONFINITE_MASKS[mask_name]()
    q, k, v = (t.contiguous() for t in _inputs(8, 8, 2, 1, torch.float32))
    q[1, 0, 2, 1] = float("nan")
    with torch.no_grad():
        for backend in ("reference", "sdpa", "flex"):
            out = attention(q, k, v, mask=mask, backend=backend)
            nan_rows = out.isnan().any(-1)  # (B, Hq, Sq)
            assert nan_rows[1, 0, 2] and int(nan_rows.sum()) == 1, backend
            zero = attention(q.nan_to_num(0.0), k, v, mask=mask, scale=0.0, backend=backend)
            allowed = torch.ones(B, 8, 8, dtype=torch.bool) if mask is None else mask.dense(B, 8, 8)
            mean = (allowed[:, None, :, :, None] * v[:, :, None]).sum(3) / allowed.sum(-1)[:, None, :, None]
            torch.testing.assert_close(zero, mean.expand_as(zero), atol=1e-5, rtol=1e-5, msg=backend)


def test_hidden_nonfinite_key_is_ignored_by_reference_and_flex():
    """The documented sdpa difference, pinned on the two backends that promise it."""
    mask = masks.padding(torch.tensor([5, 8]))
    q, k, v = (t.contiguous() for t in _inputs(8, 8, 2, 1, torch.float32))
    k[0, 0, 6, 1] = float("inf")  # key 6 of sequence 0 is padding
    with torch.no_grad():
        for backend in ("reference", "flex"):
            assert torch.isfinite(attention(q, k, v, mask=mask, backend=backend)).all(), backend


@pytest.mark.parametrize("backend", ["sdpa", "flex", "reference"])
def test_prepared_mask_into_a_compiled_block_never_recompiles(backend):
    """parallel.py compiles each block; the model prepares outside and hands in a new PreparedMask per batch."""
    from torch._dynamo.utils import counters

    S, H = 64, 2
    grad = backend != "flex"  # no flex backward on the CPU
    g = torch.Generator().manual_seed(9)
    torch._dynamo.reset()
    counters.clear()  # global across tests; reset() leaves it
    compiled = torch.compile(lambda q, k, v, m: attention(q * 1.0, k, v, mask=m), fullgraph=True, backend="eager")
    graphs = None
    for _ in range(3):
        ids = torch.sort(torch.randint(0, 4, (B, S), generator=g), dim=1).values
        mask = masks.document(ids) | masks.prefix_lm(torch.randint(0, S, (B,), generator=g))
        q, k, v = (torch.randn(B, H, S, D, generator=g).requires_grad_(grad) for _ in range(3))
        with torch.set_grad_enabled(grad):
            prepared = prepare(mask, q.shape, k.shape, q.dtype, q.device, grad, backend=backend)
            out = compiled(q, k, v, prepared)
        torch.testing.assert_close(out.double(), ref64(q, k, v, mask), **TOL[torch.float32])
        graphs = counters["stats"]["unique_graphs"] if graphs is None else graphs
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"], dict(counters["recompiles"])
