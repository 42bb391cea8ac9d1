"""Closed-form block masks (block_masks.tile_classes) against the dense mask, tile by tile.

The one property that matters: no visible (query, key) pair in a tile called empty, no hidden
pair in a tile called full (a full tile skips the mask_mod). Single masks must also equal the
exact classes (documents when their ids are non-decreasing); combinations and shuffled document
ids only have to be sound. Then: the BlockMask it builds matches the exact builder's and torch's
own transposition, flex forward with it matches a float64 dense reference, masks the closed form
does not know take the exact builder, and the builder traces under torch.compile without recompiling.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from nanollama.kernels import block_masks, masks
from nanollama.kernels.attention import attention

B = 4
# (Sq, Skv, block sizes): odd lengths, one row, Sq < Skv (decode, chunked prefill) and Sq > Skv
SHAPES = [
    (129, 129, (16, 128)),
    (300, 300, (7, 64)),
    (1000, 1000, (16, 128)),
    (300, 1000, (32, 128)),
    (1000, 300, (32, 128)),
    (200, 327, (16, 128)),  # Skv - Sq = 127: a key block's last key can be a query block's first query
    (327, 200, (16, 128)),
    (1, 129, (16,)),
    (70, 1, (16,)),
]


def _packed_ids(kv_len: int, g: torch.Generator) -> torch.Tensor:
    """(B, Skv) non-decreasing ids: long and short documents, length-1 documents, one document, any base."""
    rows = []
    for b, rate in enumerate((0.005, 0.05, 0.5, 0.0)):  # last row: a single document
        starts = torch.rand(kv_len, generator=g) < rate
        if kv_len > 4 and rate:  # two length-1 documents at random places
            i = int(torch.randint(1, kv_len - 2, (), generator=g))
            starts[i] = starts[i + 1] = starts[min(kv_len - 1, i + 2)] = True
        rows.append(torch.cumsum(starts.long(), 0) + 10 * b)
    return torch.stack(rows)


def _shuffled(ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Relabel the documents at random: the same partition, ids no longer sorted."""
    labels = torch.randperm(int(ids.max()) + 1, generator=g)
    return labels[ids]


def _cases(kv_len: int, seed: int) -> dict[str, tuple[masks.Mask, bool]]:
    """name -> (mask, whether the closed form is exact for it); fresh random per-sequence tensors."""
    g = torch.Generator().manual_seed(seed)
    ids = _packed_ids(kv_len, g)
    prefix = torch.tensor([0, kv_len, int(torch.randint(0, kv_len + 1, (), generator=g)), 1])
    lengths = torch.tensor([0, kv_len, int(torch.randint(0, kv_len + 1, (), generator=g)), 1])
    w = int(torch.randint(2, 200, (), generator=g))
    doc, pre, pad = masks.document(ids), masks.prefix_lm(prefix), masks.padding(lengths)
    return {
        "causal": (masks.causal(), True),
        "sliding_window(1)": (masks.sliding_window(1), True),
        f"sliding_window({w})": (masks.sliding_window(w), True),
        "sliding_window(5000)": (masks.sliding_window(5000), True),
        "prefix_lm": (pre, True),
        "padding": (pad, True),
        "document": (doc, True),
        "document(shuffled ids)": (masks.document(_shuffled(ids, g)), False),
        "document(random ids)": (masks.document(torch.randint(0, 3, (B, kv_len), generator=g)), False),
        "causal&padding": (masks.causal() & pad, False),
        "causal&sliding": (masks.causal() & masks.sliding_window(w), False),
        "causal|padding": (masks.causal() | pad, False),
        "document&sliding": (doc & masks.sliding_window(w), False),
        "document&padding": (doc & pad, False),
        "document|prefix": (doc | pre, False),
        "sliding|prefix": (masks.sliding_window(w) | pre, False),
        "(prefix|sliding)&padding": ((pre | masks.sliding_window(w)) & pad, False),
        "(document&sliding)|prefix": ((doc & masks.sliding_window(w)) | pre, False),
        "(shuffled document|causal)&padding": ((masks.document(_shuffled(ids, g)) | masks.causal()) & pad, False),
    }


@pytest.mark.parametrize("block", [16, 64])
def test_sliding_window_at_block_multiples(block):
    # a window edge exactly on a tile corner: the off-by-ones that random windows rarely hit
    for window in (block - 1, block, block + 1, 2 * block - 2, 2 * block - 1, 2 * block, 3 * block - 1):
        for q_len, kv_len in ((5 * block, 5 * block), (3 * block + 1, 5 * block - 2)):
            mask = masks.sliding_window(window)
            partial, full = block_masks.tile_classes(mask, B, q_len, kv_len, "cpu", block)
            any_visible, all_visible = _truth(mask, q_len, kv_len, block)
            assert torch.equal(full[:, 0], all_visible), (window, q_len, kv_len)
            assert torch.equal(partial[:, 0], any_visible & ~all_visible), (window, q_len, kv_len)


def _truth(mask: masks.Mask, q_len: int, kv_len: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the dense mask: per tile, (any pair visible, every pair of the padded tile visible)."""
    rows = B if mask.per_batch else 1
    n_q, n_kv = math.ceil(q_len / block), math.ceil(kv_len / block)
    grid = torch.zeros(rows, n_q * block, n_kv * block, dtype=torch.int32)
    grid[:, :q_len, :kv_len] = mask.dense(B, q_len, kv_len)[:rows].int()  # padding rows and columns: hidden
    visible = grid.view(rows, n_q, block, n_kv, block).sum(dim=(2, 4))  # (rows, n_q, n_kv)
    return visible > 0, visible == block * block


@pytest.mark.parametrize("q_len,kv_len,blocks", SHAPES, ids=[f"{q}x{k}" for q, k, _ in SHAPES])
def test_tile_classes_sound_and_exact(q_len, kv_len, blocks):
    for seed in range(2):
        for name, (mask, exact) in _cases(kv_len, seed=1000 * seed + q_len).items():
            for block in blocks:
                where = f"{name}, Sq={q_len}, Skv={kv_len}, block={block}, seed={seed}"
                partial, full = block_masks.tile_classes(mask, B, q_len, kv_len, "cpu", block)
                partial, full = partial[:, 0], full[:, 0]  # (B|1, n_q, n_kv): heads share the mask
                any_visible, all_visible = _truth(mask, q_len, kv_len, block)
                assert partial.shape == full.shape == any_visible.shape, where
                assert not (partial & full).any(), where
                assert not (any_visible & ~partial & ~full).any(), f"{where}: a visible pair in an empty tile"
                assert not (full & ~all_visible).any(), f"{where}: a hidden pair in a full tile"
                if exact:
                    assert torch.equal(full, all_visible), f"{where}: full tiles differ from the exact ones"
                    assert torch.equal(partial, any_visible & ~all_visible), f"{where}: partial tiles differ"
                if name.startswith("document"):  # full is exact for any ids: all four block ids equal
                    assert torch.equal(full, all_visible), where


def test_closed_form_prunes_packed_documents():
    # the point of the exercise: on packed documents the closed form skips what the exact builder skips
    S, block = 1024, 128
    ids = (torch.arange(S) // 128).expand(2, S)  # 8 documents of one block each
    partial, full = block_masks.tile_classes(masks.document(ids), 2, S, S, "cpu", block)
    assert int(partial.sum()) == 2 * 8 and int(full.sum()) == 0  # one diagonal tile per document
    exact_partial, exact_full = block_masks.block_counts(masks.document(ids), 2, S, S, "cpu", block)
    assert torch.equal(partial, exact_partial) and torch.equal(full, exact_full)


@pytest.mark.parametrize("q_len,kv_len", [(300, 300), (129, 1000), (1000, 129)])
def test_block_mask_equals_exact_builder(q_len, kv_len):
    """Single masks: the whole BlockMask (kv and q lists) equals the exact builder's."""
    for name, (mask, exact) in _cases(kv_len, seed=7).items():
        if not exact:
            continue
        ours = block_masks.build_block_mask(mask, B, q_len, kv_len, "cpu", 128)
        oracle = block_masks.build_block_mask(mask, B, q_len, kv_len, "cpu", 128, exact=True)
        assert ours.seq_lengths == oracle.seq_lengths == (q_len, kv_len), name
        assert ours.BLOCK_SIZE == oracle.BLOCK_SIZE == (128, 128), name
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(ours, field), getattr(oracle, field)), f"{name}: {field}"
        for field in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(ours, field), getattr(oracle, field)), f"{name}: {field}"
        assert ours.mask_mod is not None and ours.kv_indices.dtype == torch.int32, name


@pytest.mark.parametrize("q_len,kv_len", [(300, 300), (129, 300)])  # square tiles: one sort; else two
def test_lists_match_the_tiles_and_torchs_transposition(q_len, kv_len):
    """kv lists hold the tiles' classes; the q lists (for the backward) are their transposition, as torch's."""
    mask = _cases(kv_len, seed=3)["(prefix|sliding)&padding"][0]
    ours = block_masks.build_block_mask(mask, B, q_len, kv_len, "cpu", 64)
    partial, full = block_masks.tile_classes(mask, B, q_len, kv_len, "cpu", 64)
    assert torch.equal(ours.to_dense().bool(), partial | full)
    theirs = BlockMask.from_kv_blocks(
        ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks, ours.full_kv_indices, BLOCK_SIZE=64
    )
    for field in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert int(ours.full_kv_num_blocks.sum()) == int(full.sum()) > 0


class _Shifted(masks.Causal):
    """A user's subclass that changes the rule: j < i. Its tiles must not be classified as causal ones."""

    def _mod(self, q_len, kv_len, tensors):
        return lambda b, h, q_idx, kv_idx: kv_idx < q_idx + (kv_len - q_len)


def test_unknown_masks_take_the_exact_builder():
    S = 256  # the diagonal tiles of j < i: partial, never full
    assert block_masks.tile_classes(_Shifted(), 1, S, S, "cpu", 128) is None
    ids = torch.zeros(2, S, dtype=torch.long)
    assert block_masks.tile_classes(masks.document(ids) & _Shifted(), 2, S, S, "cpu", 128) is None
    built = block_masks.build_block_mask(masks.document(ids) & _Shifted(), 2, S, S, "cpu", 128)
    oracle = block_masks.build_block_mask(masks.document(ids) & _Shifted(), 2, S, S, "cpu", 128, exact=True)
    assert torch.equal(built.to_dense(), oracle.to_dense())
    assert torch.equal(built.full_kv_num_blocks, oracle.full_kv_num_blocks)
    assert int(built.full_kv_num_blocks.sum()) == 2 * 1  # only the tile below the diagonal, per sequence


def _ref64(q, k, v, allowed):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)  # fully masked rows: zeros
    return probs @ v.double()


@pytest.mark.parametrize("q_len,kv_len", [(300, 300), (129, 300), (300, 129)])
def test_flex_forward_matches_dense_reference(q_len, kv_len):
    g = torch.Generator().manual_seed(q_len + kv_len)
    cases = _cases(kv_len, seed=11)
    with torch.no_grad():
        names = ("document", "prefix_lm", "document(shuffled ids)", "(document&sliding)|prefix", "document&padding")
        for name in names:
            mask = cases[name][0]
            q = torch.randn(B, 2, q_len, 16, generator=g)
            k, v = (torch.randn(B, 2, kv_len, 16, generator=g) for _ in range(2))
            out = attention(q, k, v, mask=mask, backend="flex")
            want = _ref64(q, k, v, mask.dense(B, q_len, kv_len))
            torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_builder_traces_in_one_graph_without_recompiles():
    """Blocks are compiled whole in training, so a batch's first layer builds its BlockMask under dynamo."""
    from torch._dynamo.utils import counters

    S = 200

    def summary(x, mask):
        bm = block_masks.build_block_mask(mask, 2, S, S, "cpu", 128)
        return x + bm.kv_num_blocks.sum() + 10 * bm.full_kv_num_blocks.sum() + 100 * bm.full_q_num_blocks.sum()

    compiled = torch.compile(summary, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    graphs = None
    for _ in range(3):
        ids = torch.sort(torch.randint(0, 5, (2, S), generator=g), dim=1).values
        prefix = torch.randint(0, S, (2,), generator=g)
        x = torch.zeros(())
        got = compiled(x, masks.document(ids) | masks.prefix_lm(prefix))
        assert torch.equal(got, summary(x, masks.document(ids) | masks.prefix_lm(prefix)))
        graphs = counters["stats"]["unique_graphs"] if graphs is None else graphs
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch recompiled the builder"


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    """A batch's masks arrive with CPU tensors (the data layout makes them there): building their BlockMasks
    on the GPU, the copies of those tensors included, never waits for the GPU."""
    S, device = 1000, torch.device("cuda")
    cases = _cases(S, seed=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        built = {name: block_masks.build_block_mask(mask, B, S, S, device, 128) for name, (mask, _) in cases.items()}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, (mask, exact) in cases.items():
        oracle = block_masks.build_block_mask(mask, B, S, S, device, 128, exact=True)
        assert not (oracle.to_dense().bool() & ~built[name].to_dense().bool()).any(), name
        if exact:
            assert torch.equal(built[name].kv_indices, oracle.kv_indices), name
            assert torch.equal(built[name].full_kv_indices, oracle.full_kv_indices), name
