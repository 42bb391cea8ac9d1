"""The flash backend's packing (document and padding masks through flash-attn's varlen API) on the CPU.

flash-attn is CUDA-only, so these tests put a fake `flash_attn` module in sys.modules: float64 eager
versions of flash_attn_func and flash_attn_varlen_func written from flash-attn's documented
semantics (causal aligned to the bottom-right corner of each sequence, window_size=(left, right)
around that diagonal, query head h reading kv head h // (Hq / Hk), a row with no key gives zeros),
independently of nanollama's masks. With the device check bypassed, `attention(..., backend="flash")`
must equal the float64 dense reference forward and backward. The real kernels: the gpu test at the end.
"""

from __future__ import annotations

import importlib.machinery
import math
import re
import sys
import types

import pytest
import torch

from nanollama.kernels import attention_backends, attention_flash, dispatch, masks
from nanollama.kernels.attention import attention, attention_ref, flash_available, flash_supports, prepare
from nanollama.kernels.dispatch import module_found

B, D = 2, 16


# -- a fake flash_attn: float64, from flash-attn's docstrings --------------------------------------
def _attend(q, k, v, scale, causal, window):
    """One sequence: q (sq, Hq, D), k and v (sk, Hk, D) -> (sq, Hq, D) in float64."""
    sq, hq = q.shape[:2]
    sk, hk = k.shape[:2]
    left, right = window
    if causal:
        right = 0  # causal is the window (left, 0)
    # query i faces the diagonal key i + sk - sq (bottom-right alignment); -1 means unbounded
    diagonal = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        keep &= j <= diagonal + right
    if left >= 0:
        keep &= j >= diagonal - left
    head_of = torch.arange(hq) // (hq // hk)  # query head -> its kv head
    kk, vv = k.double()[:, head_of], v.double()[:, head_of]  # (sk, Hq, D)
    scores = torch.einsum("ihd,jhd->hij", q.double(), kk) * scale
    empty = ~keep.any(dim=1)  # (sq,)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(empty[:, None], 0.0)
    probs = torch.softmax(scores, dim=-1) * (~empty)[:, None].double()  # "a row with no key outputs zero"
    return torch.einsum("hij,jhd->ihd", probs, vv)


def _check_layout(*tensors):
    for t in tensors:
        assert t.stride(-1) == 1, "flash-attn needs a contiguous last dimension"


class FakeFlash:
    def __init__(self):
        self.calls: list[dict] = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        assert q.dim() == 4 and k.shape == v.shape and q.shape[2] % k.shape[2] == 0 and dropout_p == 0.0
        _check_layout(q, k, v)
        self.calls.append(dict(fn="func", causal=causal, window_size=tuple(window_size)))
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out = [_attend(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])]
        return torch.stack(out).to(q.dtype)

    def flash_attn_varlen_func(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
    ):
        assert q.dim() == 3 and k.shape == v.shape and q.shape[1] % k.shape[1] == 0 and dropout_p == 0.0
        _check_layout(q, k, v)
        for cu, total, longest in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
            assert int(cu[0]) == 0 and int(cu[-1]) == total, "cu_seqlens must span the packed tokens"
            lengths = (cu[1:] - cu[:-1]).tolist()
            assert min(lengths) > 0 and max(lengths) <= longest and isinstance(longest, int)
        assert cu_seqlens_q.shape == cu_seqlens_k.shape
        self.calls.append(dict(fn="varlen", causal=causal, window_size=tuple(window_size), cu_q=cu_seqlens_q.tolist()))
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, qe, ks, ke = (
                int(cu_seqlens_q[i]),
                int(cu_seqlens_q[i + 1]),
                int(cu_seqlens_k[i]),
                int(cu_seqlens_k[i + 1]),
            )
            out.append(_attend(q[qs:qe], k[ks:ke], v[ks:ke], scale, causal, window_size))
        return torch.cat(out).to(q.dtype)


@pytest.fixture
def fake_flash(monkeypatch):
    """The fake flash_attn importable, and the CUDA/dtype check bypassed (the mask checks stay)."""
    fake = FakeFlash()
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_func = fake.flash_attn_func
    module.flash_attn_varlen_func = fake.flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention_flash, "_hardware_reason", lambda *a: None)
    module_found.cache_clear()
    yield fake
    module_found.cache_clear()


# -- inputs and the float64 comparison ------------------------------------------------------------
def _inputs(Sq, Skv, Hq, Hk, seed=0, layout="bshd"):
    """float64 q, k, v (B, H, S, D): views of (B, S, H, D) storage (the model's layout), or contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bhsd":
        return tuple(
            torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hk, Skv), (Hk, Skv))
        )
    return tuple(
        torch.randn(B, s, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        for h, s in ((Hq, Sq), (Hk, Skv), (Hk, Skv))
    )


def _check(mask, Sq, Skv, Hq, Hk, layout="bshd", scale=None):
    """attention(backend="flash") == attention_ref in float64, forward and backward (shared upstream)."""
    q, k, v = _inputs(Sq, Skv, Hq, Hk, layout=layout)
    got_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*got_leaves, mask=mask, scale=scale, backend="flash")
    want = attention_ref(*want_leaves, mask=mask, scale=scale)
    assert out.shape == (B, Hq, Sq, D) and out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    for name, got, ref in zip("qkv", got_leaves, want_leaves):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
    if mask is not None:  # rows with no visible key: zero output, zero gradient
        empty = ~mask.dense(B, Sq, Skv).any(-1)  # (B, Sq)
        assert (out.detach().transpose(1, 2)[empty] == 0).all() and (
            got_leaves[0].grad.transpose(1, 2)[empty] == 0
        ).all()
    return out


def _sorted_ids(S, documents, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, documents, (B, S), generator=g), dim=1).values


def _ragged_ids(S, seed):
    """Documents of random lengths 1..S/3, some of length 1; ids need not start at 0 or be consecutive."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < S:
            lengths.append(int(torch.randint(1, S // 3, (), generator=g)) if len(lengths) % 3 else 1)
        ids = torch.repeat_interleave(torch.arange(len(lengths)) * 7 + 3, torch.tensor(lengths))[:S]
        rows.append(ids)
    return torch.stack(rows)


def _recurring_ids(S, seed):
    """Unsorted ids: a document comes back after another one ([0, 0, 1, 0] style) in both rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (B, S), generator=g)
    ids[:, :3] = torch.tensor([0, 1, 0])
    return ids


# -- the accepted masks match the reference -------------------------------------------------------
@pytest.mark.parametrize(
    "S,Hq,Hk,ids",
    [
        (70, 4, 2, "sorted"),  # odd length, GQA
        (129, 2, 2, "ragged"),  # one past a block, documents of length 1
        (129, 4, 1, "sorted"),  # multi-query
        (70, 4, 2, "recurring"),  # ids come back: packed after a stable sort by id
        (33, 2, 1, "one"),  # a single document = causal
    ],
)
def test_document_matches_reference(fake_flash, S, Hq, Hk, ids):
    make = {
        "sorted": lambda: _sorted_ids(S, 4, S),
        "ragged": lambda: _ragged_ids(S, S),
        "recurring": lambda: _recurring_ids(S, S),
        "one": lambda: torch.full((B, S), 5),
    }[ids]
    _check(masks.document(make()), S, S, Hq, Hk)
    assert [c["fn"] for c in fake_flash.calls] == ["varlen"] and fake_flash.calls[0]["causal"]


@pytest.mark.parametrize(
    "combine,window_size",
    [
        (lambda ids: masks.document(ids) & masks.sliding_window(17), (16, 0)),
        (lambda ids: masks.causal() & masks.document(ids), (-1, -1)),
        (lambda ids: masks.sliding_window(9) & masks.document(ids) & masks.causal() & masks.sliding_window(5), (4, 0)),
    ],
)
@pytest.mark.parametrize("S,Hq,Hk", [(70, 4, 2), (129, 2, 1)])
def test_document_combinations_match_reference(fake_flash, combine, window_size, S, Hq, Hk):
    _check(combine(_ragged_ids(S, S + 1)), S, S, Hq, Hk)
    assert fake_flash.calls[0]["fn"] == "varlen" and fake_flash.calls[0]["window_size"] == window_size


def test_recurring_ids_with_causal_match_reference(fake_flash):
    _check(masks.causal() & masks.document(_recurring_ids(129, 1)), 129, 129, 4, 2, layout="bhsd", scale=0.3)


@pytest.mark.parametrize(
    "Sq,Skv,Hq,Hk,lengths",
    [
        (70, 70, 4, 2, [0, 33]),  # sequence 0 sees nothing: zeros, zero gradient
        (70, 129, 4, 1, [129, 1]),  # Sq < Skv: padding has no causality, so no alignment question
        (129, 70, 2, 2, [500, 17]),  # Sq > Skv, a length past Skv (every key visible)
        (70, 70, 2, 1, [70, 70]),  # nothing padded: no gather
    ],
)
def test_padding_matches_reference(fake_flash, Sq, Skv, Hq, Hk, lengths):
    _check(masks.padding(torch.tensor(lengths)), Sq, Skv, Hq, Hk)
    assert [c["fn"] for c in fake_flash.calls] == ["varlen"] and not fake_flash.calls[0]["causal"]


@pytest.mark.parametrize(
    "mask,Sq,Skv",
    [
        (None, 70, 129),
        (masks.causal(), 70, 129),
        (masks.sliding_window(17), 129, 129),
        (masks.causal() & masks.sliding_window(17) & masks.sliding_window(30), 70, 129),
    ],
)
def test_fixed_length_masks_match_reference(fake_flash, mask, Sq, Skv):
    _check(mask, Sq, Skv, 4, 2, layout="bhsd")
    assert [c["fn"] for c in fake_flash.calls] == ["func"]


# -- what the plans hold, and that they are built once per mask -----------------------------------
def test_document_plan_offsets(fake_flash):
    plan = attention_flash._document_plan(torch.tensor([[0, 0, 0, 1, 1], [5, 6, 6, 6, 6]]), torch.device("cpu"))
    assert plan.cu_q.tolist() == plan.cu_k.tolist() == [0, 3, 5, 6, 10] and plan.cu_q.dtype == torch.int32
    assert plan.max_q == plan.max_k == 4 and plan.q_rows is None and plan.k_rows is None
    # [0, 0, 1, 0]: id 0 recurs, so the row is packed as tokens 0, 1, 3 (document 0) then 2 (document 1)
    plan = attention_flash._document_plan(torch.tensor([[0, 0, 1, 0], [2, 2, 2, 2]]), torch.device("cpu"))
    assert plan.q_rows.tolist() == plan.k_rows.tolist() == [0, 1, 3, 2, 4, 5, 6, 7]
    assert plan.cu_q.tolist() == [0, 3, 4, 8] and plan.max_q == 4


def test_padding_plan_rows(fake_flash):
    # lengths clamp to [0, Skv]; row 0 has no key and is left out of the packing
    plan = attention_flash._padding_plan(torch.tensor([0, 3, 9]), 3, 2, 4, torch.device("cpu"))
    assert plan.q_rows.tolist() == [2, 3, 4, 5] and plan.k_rows.tolist() == [4, 5, 6, 8, 9, 10, 11]
    assert plan.cu_q.tolist() == [0, 2, 4] and plan.cu_k.tolist() == [0, 3, 7]
    assert (plan.max_q, plan.max_k) == (2, 4)
    assert attention_flash._padding_plan(torch.tensor([0, -2]), 2, 2, 4, torch.device("cpu")) is None


def test_plan_built_once_per_prepare(fake_flash, monkeypatch):
    builds = []
    real = attention_flash._document_plan
    monkeypatch.setattr(attention_flash, "_document_plan", lambda *a: builds.append(1) or real(*a))
    q, k, v = _inputs(70, 70, 4, 2)
    ids = _recurring_ids(70, 3)
    assert "recurs" in flash_supports(q, k, masks.document(ids) & masks.sliding_window(40))  # after one build
    assert len(builds) == 1
    prepared = prepare(masks.document(ids), q.shape, k.shape, q.dtype, q.device, False, backend="flash")
    assert len(builds) == 2
    want = attention_ref(q, k, v, masks.document(ids))
    for _layer in range(3):  # every layer reuses the forward's plan
        torch.testing.assert_close(attention(q, k, v, mask=prepared), want, atol=1e-5, rtol=1e-5)
    assert len(builds) == 2
    attention(q, k, v, mask=masks.document(ids), backend="flash")  # a Mask: prepared inline, a new plan
    assert len(builds) == 3


# -- refusals say why, and auto falls back --------------------------------------------------------
REFUSED = [  # (mask, Sq, Skv, reason)
    (masks.causal() & masks.padding(torch.tensor([3, 70])), 70, 70, "aligns causality to each sequence's last"),
    (masks.sliding_window(5) & masks.padding(torch.tensor([3, 70])), 70, 70, "aligns causality"),
    (
        masks.document(torch.zeros(B, 70, dtype=torch.long)) & masks.padding(torch.tensor([3, 70])),
        70,
        70,
        "cannot combine",
    ),
    (masks.prefix_lm(torch.tensor([3, 9])), 70, 70, "no 'prefix_lm' mask"),
    (masks.sliding_window(5) | masks.causal(), 70, 70, r"no '\(sliding_window\|causal\)' mask"),
    (masks.document(_sorted_ids(129, 3, 0)), 70, 129, r"self-attention only \(Sq == Skv\), not Sq=70, Skv=129"),
    (masks.document(_recurring_ids(70, 0)) & masks.sliding_window(9), 70, 70, r"id recurs .* \[0, 0, 1, 0\]"),
    (masks.padding(torch.tensor([0, 0])), 70, 70, "every padding length is 0"),
    (masks.causal(), 129, 70, "needs Sq <= Skv"),
]


@pytest.mark.parametrize("mask,Sq,Skv,reason", REFUSED)
def test_refused_masks_say_why(fake_flash, tmp_path, monkeypatch, mask, Sq, Skv, reason):
    q, k, v = _inputs(Sq, Skv, 4, 2)
    assert flash_supports(q, k, mask) is not None
    with pytest.raises(RuntimeError, match=f"attention backend 'flash': .*{reason}"):
        attention(q, k, v, mask=mask, backend="flash")
    assert re.search(reason, attention_backends.unsupported("flash", mask, q.shape, k.shape, q.dtype, q.device, True))
    assert "flash" not in dispatch.candidates(mask, q.shape, k.shape, q.dtype, q.device, True)
    # auto takes another backend, and gets the reference's answer
    monkeypatch.setenv("NANOLLAMA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOLLAMA_ATTENTION", raising=False)
    dispatch.clear_memory_cache()
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, mask=mask), attention_ref(q, k, v, mask))
    dispatch.clear_memory_cache()
    assert not fake_flash.calls


def test_auto_considers_flash_for_documents(fake_flash):
    q, k, v = _inputs(70, 70, 4, 2)
    assert "flash" in dispatch.candidates(masks.document(_ragged_ids(70, 0)), q.shape, k.shape, q.dtype, q.device, True)


def test_refused_while_tracing(fake_flash, monkeypatch):
    q, k, _ = _inputs(70, 70, 4, 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile trace" in flash_supports(q, k, masks.document(_ragged_ids(70, 0)))
    assert flash_supports(q, k, masks.causal()) is None  # fixed-length masks need no host values


def test_public_check_still_refuses_cpu(monkeypatch):
    module = types.ModuleType("flash_attn")  # "installed", but the device check is the real one
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    module_found.cache_clear()
    try:
        q, k, v = _inputs(70, 70, 4, 2)
        mask = masks.document(_ragged_ids(70, 0))
        assert flash_supports(q, k, mask) == "flash-attn runs on CUDA tensors only"
        with pytest.raises(RuntimeError, match="attention backend 'flash': flash-attn runs on CUDA tensors only"):
            attention(q, k, v, mask=mask, backend="flash")
    finally:
        module_found.cache_clear()


# -- the real flash-attn ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "name,Sq,Skv,Hq,Hk",
    [
        ("document", 129, 129, 4, 2),
        ("document", 256, 256, 4, 1),
        ("recurring", 129, 129, 4, 2),
        ("document&sliding", 256, 256, 4, 2),
        ("padding", 129, 129, 4, 2),
        ("padding", 70, 129, 4, 1),
    ],
)
def test_gpu_real_flash_attn_bf16(name, Sq, Skv, Hq, Hk):
    if not flash_available():
        pytest.skip("flash-attn is not installed")
    Dg = 64
    mask = {
        "document": lambda: masks.document(_ragged_ids(Skv, 1).cuda()),
        "recurring": lambda: masks.document(_recurring_ids(Skv, 1).cuda()),
        "document&sliding": lambda: masks.document(_sorted_ids(Skv, 5, 1).cuda()) & masks.sliding_window(40),
        "padding": lambda: masks.padding(torch.tensor([0, Skv // 2 + 1], device="cuda")),
    }[name]()
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((Hq, Sq), (Hk, Skv), (Hk, Skv))
    leaves = [torch.randn(B, s, h, Dg, generator=g, device="cuda").bfloat16().transpose(1, 2) for h, s in shapes]
    leaves = [t.detach().requires_grad_() for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    out = attention(*leaves, mask=mask, backend="flash")
    want = attention_ref(*ref_leaves, mask=mask)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    upstream = torch.randn(out.shape, generator=g, device="cuda")
    (out.float() * upstream).sum().backward()
    (want * upstream.double()).sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=3e-2, rtol=3e-2)
    empty = ~mask.dense(B, Sq, Skv, "cuda").any(-1)
    assert (out.detach().transpose(1, 2)[empty] == 0).all()
    assert math.isfinite(float(out.float().abs().sum()))
