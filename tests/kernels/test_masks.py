"""Masks: dense form against loop definitions written from the spec, block masks (closed form and
exact builder) against torch's own create_block_mask, caching (built once per batch, shared by layers), and argument
errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from nanollama.kernels import block_masks, masks
from nanollama.kernels.attention import prepare

B = 3
SHAPES = [(70, 70), (129, 129), (70, 129), (129, 70)]  # (Sq, Skv): odd, Sq < Skv (decode), Sq > Skv


def _loop_dense(rule, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask by its definition, one (b, i, j) at a time; i is the query's absolute position."""
    offset = kv_len - q_len  # queries are the last Sq positions
    rows = [[[rule(b, qi + offset, j) for j in range(kv_len)] for qi in range(q_len)] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.bool)


def _cases(kv_len: int):
    """(mask, rule) pairs; fresh random per-sequence tensors, including a fully masked sequence."""
    g = torch.Generator().manual_seed(kv_len)
    prefix = torch.randint(0, kv_len, (B,), generator=g)
    ids = torch.sort(torch.randint(0, 5, (B, kv_len), generator=g), dim=1).values
    lengths = torch.tensor([0, kv_len // 3, kv_len])  # length 0: every row of sequence 0 is fully masked
    window = 9
    prefix_l, ids_l, lengths_l = prefix.tolist(), ids.tolist(), lengths.tolist()  # plain ints: fast loops
    causal = lambda b, i, j: j <= i
    prefix_rule = lambda b, i, j: j <= i or j < prefix_l[b]
    doc_rule = lambda b, i, j: j <= i and i >= 0 and ids_l[b][i] == ids_l[b][j]
    window_rule = lambda b, i, j: j <= i and i - j < window
    pad_rule = lambda b, i, j: j < lengths_l[b]
    return {
        "causal": (masks.causal(), causal),
        "prefix_lm": (masks.prefix_lm(prefix), prefix_rule),
        "document": (masks.document(ids), doc_rule),
        "sliding_window": (masks.sliding_window(window), window_rule),
        "padding": (masks.padding(lengths), pad_rule),
        "causal&padding": (
            masks.causal() & masks.padding(lengths),
            lambda b, i, j: causal(b, i, j) and pad_rule(b, i, j),
        ),
        "document&sliding": (
            masks.document(ids) & masks.sliding_window(window),
            lambda b, i, j: doc_rule(b, i, j) and window_rule(b, i, j),
        ),
        "sliding|prefix": (
            masks.sliding_window(window) | masks.prefix_lm(prefix),
            lambda b, i, j: window_rule(b, i, j) or prefix_rule(b, i, j),
        ),
        "(prefix|sliding)&padding": (
            (masks.prefix_lm(prefix) | masks.sliding_window(window)) & masks.padding(lengths),
            lambda b, i, j: (prefix_rule(b, i, j) or window_rule(b, i, j)) and pad_rule(b, i, j),
        ),
    }


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
def test_dense_matches_definition(q_len, kv_len):
    for name, (mask, rule) in _cases(kv_len).items():
        expected = _loop_dense(rule, B, q_len, kv_len)
        got = mask.dense(B, q_len, kv_len)
        assert got.shape == (B, q_len, kv_len) and got.dtype == torch.bool, name
        assert torch.equal(got, expected), f"{name} at Sq={q_len}, Skv={kv_len}"


@pytest.mark.parametrize("exact", [False, True], ids=["closed_form", "exact"])
@pytest.mark.parametrize("q_len,kv_len", [(256, 256), (129, 129), (70, 129), (300, 257)])
def test_block_mask_matches_torch(q_len, kv_len, exact, monkeypatch):
    # a tiny chunk forces the exact builder through several query-block chunks; 256 fills its blocks exactly
    monkeypatch.setattr(block_masks, "_CHUNK_ELEMENTS", 1)
    for name, (mask, _) in _cases(kv_len).items():
        ours = block_masks.build_block_mask(mask, B, q_len, kv_len, torch.device("cpu"), 128, exact=exact)
        theirs = create_block_mask(mask.mask_mod_for(q_len, kv_len), B, None, q_len, kv_len, device="cpu")
        assert ours.seq_lengths == (q_len, kv_len), name
        computed, full = ours.to_dense().expand_as(theirs.to_dense()), _full_tiles(ours).expand_as(_full_tiles(theirs))
        if exact or not ("&" in name or "|" in name):
            assert torch.equal(computed, theirs.to_dense()), name
            assert torch.equal(full, _full_tiles(theirs)), f"{name}: full blocks differ"
        else:  # combined closed-form bounds may only be looser: no tile torch computes skipped, no extra full tile
            assert not (theirs.to_dense().bool() & ~computed.bool()).any(), name
            assert not (full & ~_full_tiles(theirs)).any(), f"{name}: a full tile torch calls partial"
        # and the mask_mod itself agrees with the dense form, through torch's own evaluator
        dense = create_mask(mask.mask_mod_for(q_len, kv_len), B, 1, q_len, kv_len, device="cpu")[:, 0]
        assert torch.equal(dense, mask.dense(B, q_len, kv_len)), name


def _full_tiles(bm) -> torch.Tensor:
    """(B, H, n_q, n_kv) bool: the tiles a BlockMask computes without its mask_mod."""
    n_q, n_kv = bm.full_kv_indices.shape[-2:]
    cols = torch.arange(n_kv)
    listed = cols < bm.full_kv_num_blocks[..., None]  # (B, H, n_q, n_kv): the first count entries are valid
    out = torch.zeros(*bm.full_kv_indices.shape[:-1], n_kv, dtype=torch.bool)
    return out.scatter(-1, bm.full_kv_indices.long(), listed)


def test_block_mask_is_sparse_where_it_should_be():
    S = 1024
    causal = block_masks.build_block_mask(masks.causal(), 1, S, S, "cpu", 128)
    # 8x8 tiles: 8 diagonal partial tiles, 28 full tiles below, none above
    assert int(causal.kv_num_blocks.sum()) == 8 and int(causal.full_kv_num_blocks.sum()) == 28
    window = block_masks.build_block_mask(masks.sliding_window(128), 1, S, S, "cpu", 128)
    assert int(window.kv_num_blocks.sum() + window.full_kv_num_blocks.sum()) == 8 + 7  # diagonal + one below


def test_masks_hold_no_caches():
    """Nothing is memoised on a mask or module-wide: prepare() builds once per forward instead."""
    mask = masks.document(torch.zeros(2, 200, dtype=torch.long))
    first = mask.dense(2, 200, 200)
    assert first.data_ptr() != mask.dense(2, 200, 200).data_ptr()  # built anew on each call
    assert not hasattr(masks, "_STATIC_CACHE") and not hasattr(mask, "_built")
    assert masks.causal().dense(4, 100, 100).untyped_storage().nbytes() == 100 * 100  # expanded over B


def test_kinds_and_flags():
    p, ids = torch.tensor([1, 2]), torch.zeros(2, 8, dtype=torch.long)
    combined = masks.causal() & masks.padding(p) & masks.document(ids)
    assert combined.kind == "(causal&padding&document)" and len(combined.parts) == 3
    assert (masks.causal() | masks.prefix_lm(p)).kind == "(causal|prefix_lm)"
    assert masks.causal().is_causal and not combined.is_causal and not masks.sliding_window(3).is_causal
    assert combined.per_batch and not (masks.causal() & masks.sliding_window(3)).per_batch
    assert masks.causal().density(1, 4, 4) == pytest.approx(10 / 16)


def test_mask_mod_works_inside_flex_vmap():
    # flex evaluates mask_mod on scalar index tensors: the same closure must work there
    prefix = torch.tensor([3, 0])
    mod = masks.prefix_lm(prefix).mask_mod
    b, h = torch.tensor(0), torch.tensor(0)
    assert bool(mod(b, h, torch.tensor(1), torch.tensor(2)))  # inside the prompt
    assert not bool(mod(torch.tensor(1), h, torch.tensor(1), torch.tensor(2)))  # no prompt: causal


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: masks.sliding_window(0), "sliding_window: window must be a positive int"),
        (lambda: masks.sliding_window(2.5), "sliding_window: window"),
        (lambda: masks.prefix_lm(torch.tensor([[1]])), "prefix_lm: prefix_lengths must be a 1-D integer tensor"),
        (lambda: masks.prefix_lm(torch.tensor([1.0])), "prefix_lm: prefix_lengths"),
        (lambda: masks.document(torch.zeros(4, dtype=torch.long)), "document: document_ids must be a 2-D integer"),
        (lambda: masks.padding([1, 2]), "padding: lengths must be a 1-D integer tensor"),
        (lambda: masks.prefix_lm(torch.tensor([1, 2])).dense(3, 4, 4), "prefix_lm: holds 2 sequences"),
        (
            lambda: masks.document(torch.zeros(2, 5, dtype=torch.long)).dense(2, 4, 4),
            "document: document_ids has length 5",
        ),
        (
            lambda: prepare(masks.padding(torch.tensor([1])), (2, 1, 4, 8), (2, 1, 4, 8), torch.float32, "cpu", False),
            "padding: holds 1 sequences",
        ),
    ],
)
def test_errors_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
    with pytest.raises(TypeError):
        masks.causal() & "causal"
