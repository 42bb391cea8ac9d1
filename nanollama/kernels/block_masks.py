"""Build FlexAttention BlockMasks eagerly, without torch.compile, in O(B * tiles + B * S) work.

A BlockMask needs, per (query block x key block) tile, one of three classes: empty (skipped),
full (computed without the mask_mod) or partial (the kernel applies the mask_mod inside). Two
builders produce them, both with plain tensor ops (same code on the CPU and CUDA, no host sync,
nothing recompiles when a new batch brings new per-sequence tensors):

- `tile_classes`, the closed form used by default: every built-in mask classifies a tile from its
  block bounds alone (causal, sliding window), plus a per-sequence scalar (prefix length, padding
  length) or per-block id ranges (documents); `&` and `|` combine the per-tile answers. It costs
  O(B * n_q * n_kv) tile comparisons plus O(B * S) per-token work, never O(S^2).
- `block_counts`, the exact builder: evaluates the mask_mod on every (query, key) pair, in
  query-block chunks of at most `_CHUNK_ELEMENTS` booleans, and counts each tile's visible pairs.
  O(B * Sq * Skv); the fallback for masks the closed form does not know (user subclasses), and
  the oracle in the tests.

Soundness is what matters: a tile holding any visible pair must not be "empty", a tile holding
any hidden pair must not be "full". Calling a full tile partial only costs speed (the kernel
evaluates the mask_mod there). So each closed-form rule gives two bounds per tile:
  some:  False only if no in-range pair of the tile is visible (an upper bound on "any visible");
  every: True only if every in-range pair of the tile is visible (a lower bound on "all visible").
The single masks are exact (equal to `block_counts`; documents when the ids are non-decreasing
along each sequence, as packed data is; otherwise still sound, merely looser). `a & b` and `a | b`
combine bounds (some = some_a & some_b, every = every_a & every_b; | alike), which stays sound but
may call a few boundary tiles partial that the exact builder would call empty or full.

Tiles past the end of the sequence count as masked, as in create_block_mask, so the last
partial tile is never "full" and the kernel evaluates the mask_mod there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanollama.kernels import masks as _masks

_CHUNK_ELEMENTS = 1 << 26  # booleans evaluated at once by the exact builder (64 MiB)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (..., rows, cols) -> (count (..., rows), indices (..., rows, cols)): each row's True columns first."""
    # every device sorts uint8; a cast, not a view: inductor in torch 2.11 cannot lower bool.view(uint8)
    keys = tiles.to(torch.uint8)
    counts = keys.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(keys, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def block_counts(
    mask, batch: int, q_len: int, kv_len: int, device, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tile classification: (partial, full), each bool (B or 1, 1, n_q_blocks, n_kv_blocks)."""
    rows_b = batch if mask.per_batch else 1
    n_q = -(-q_len // block_size)
    n_kv = -(-kv_len // block_size)
    tile = block_size * block_size
    partial = torch.empty(rows_b, n_q, n_kv, dtype=torch.bool, device=device)
    full = torch.empty_like(partial)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (rows_b * block_size * n_kv * block_size))
    for start in range(0, n_q, rows_per_chunk):
        stop = min(n_q, start + rows_per_chunk)
        # (B|1, rows*block, n_kv*block)
        allowed = mask.evaluate(batch, q_len, kv_len, device, start * block_size, stop * block_size, n_kv * block_size)
        rows = stop - start
        # count the visible pairs of each tile: first along the contiguous key axis (a fast
        # reduction), (B, rows*block, n_kv, block) -> (B, rows*block, n_kv), then over the tile's queries
        counts = allowed.reshape(rows_b, rows * block_size, n_kv, block_size)
        counts = counts.sum(dim=-1, dtype=torch.int32).view(rows_b, rows, block_size, n_kv).sum(dim=2)
        partial[:, start:stop] = (counts > 0) & (counts < tile)
        full[:, start:stop] = counts == tile
    return partial[:, None], full[:, None]  # (B|1, H=1, n_q, n_kv): heads share the mask


@dataclass
class _Tiles:
    """Block geometry of a (Sq, Skv) call. Positions are absolute (query i sits at i + Skv - Sq)."""

    q_len: int
    kv_len: int
    block: int
    n_q: int
    n_kv: int
    q_first: torch.Tensor  # (n_q, 1) position of each query block's first query
    q_last: torch.Tensor  # (n_q, 1) ... and of its last in-range query
    kv_first: torch.Tensor  # (1, n_kv) first key of each key block
    kv_last: torch.Tensor  # (1, n_kv) last in-range key
    inner: torch.Tensor  # (n_q, n_kv) False for tiles reaching past Sq or Skv: those are never full
    causal_some: torch.Tensor  # (n_q, n_kv) some key of the tile at or before some query (kv_first <= q_last)
    causal_every: torch.Tensor  # (n_q, n_kv) every key at or before every query (kv_last <= q_first)

    @classmethod
    def of(cls, q_len: int, kv_len: int, block: int, device) -> _Tiles:
        """The geometry, a dozen small tensors: built per block-mask build (once per forward)."""
        n_q, n_kv = -(-q_len // block), -(-kv_len // block)
        q0 = torch.arange(n_q, device=device)[:, None] * block  # (n_q, 1) first row
        k0 = torch.arange(n_kv, device=device)[None, :] * block  # (1, n_kv)
        q1 = (q0 + block).clamp(max=q_len) - 1
        k1 = (k0 + block).clamp(max=kv_len) - 1
        inner = (q0 + block <= q_len) & (k0 + block <= kv_len)  # (n_q, n_kv)
        q_first, q_last = q0 + (kv_len - q_len), q1 + (kv_len - q_len)
        causal = (k0 <= q_last, k1 <= q_first)
        return cls(q_len, kv_len, block, n_q, n_kv, q_first, q_last, k0, k1, inner, *causal)

    def block_ranges(self, ids: torch.Tensor, queries: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block (min, max) of per-key values ids (B, Skv): (B, n, 1) for query blocks, (B, 1, n) for key blocks."""
        values = ids
        if queries:  # the value at each query row's absolute position
            offset = self.kv_len - self.q_len
            if offset >= 0:
                values = ids[:, offset:]
            else:  # rows before position 0 read key 0, as the mask_mod's clamped lookup does
                values = torch.cat((ids[:, :1].expand(-1, -offset), ids), dim=1)
        n = self.n_q if queries else self.n_kv
        pad = n * self.block - values.shape[1]
        if pad:  # repeat the last value: the last block's min and max are unchanged
            values = torch.cat((values, values[:, -1:].expand(-1, pad)), dim=1)
        lo, hi = torch.aminmax(values.reshape(values.shape[0], n, self.block), dim=-1)  # (B, n) each
        return (lo[:, :, None], hi[:, :, None]) if queries else (lo[:, None, :], hi[:, None, :])


# Each rule: (mask, its tensors on the device, tiles) -> (some, every), bool, broadcastable to (B|1, n_q, n_kv).


def _causal(mask, tensors, t: _Tiles):
    return t.causal_some, t.causal_every


def _sliding_window(mask, tensors, t: _Tiles):
    # query p sees key j iff 0 <= p - j < window; over a tile p - j spans every integer in [near, far]
    near, far = t.q_first - t.kv_last, t.q_last - t.kv_first
    return (far >= 0) & (near < mask.window), (near >= 0) & (far < mask.window)


def _prefix_lm(mask, tensors, t: _Tiles):
    prefix = tensors[0].view(-1, 1, 1)  # (B, 1, 1)
    some = t.causal_some | (t.kv_first < prefix)
    # every key j of the tile must sit in the prompt (j < prefix) or at or before the tile's first query
    return some, t.causal_every | (t.kv_last < prefix)


def _padding(mask, tensors, t: _Tiles):
    lengths = tensors[0].view(-1, 1, 1)  # (B, 1, 1)
    return t.kv_first < lengths, t.kv_last < lengths


def _document(mask, tensors, t: _Tiles):
    # A visible pair shares an id, so it needs overlapping id ranges: sound for any ids. With ids
    # non-decreasing along the sequence the ranges overlap only if the blocks share an id, and then
    # causality alone decides (the shared document is a contiguous run), so the rule is exact.
    # Query rows before position 0 (Sq > Skv) read key 0's id: it only widens the range (still
    # sound), and such a tile is never "every" since its rows see nothing.
    (ids,) = tensors
    k_lo, k_hi = t.block_ranges(ids, queries=False)
    q_lo, q_hi = (k_lo.transpose(1, 2), k_hi.transpose(1, 2)) if t.q_len == t.kv_len else t.block_ranges(ids, True)
    some = t.causal_some & (q_lo <= k_hi) & (k_lo <= q_hi)
    one_id = (q_lo == k_hi) & (q_hi == k_lo)  # with lo <= hi in each block: all four ids equal
    return some, t.causal_every & one_id


def _combined(mask, tensors, t: _Tiles):
    join = torch.logical_and if type(mask) is _masks.And else torch.logical_or
    some = every = None
    i = 0
    for part in mask.parts:
        n = len(part._tensors())
        bounds = _bounds(part, tensors[i : i + n], t)
        i += n
        if bounds is None:
            return None
        some = bounds[0] if some is None else join(some, bounds[0])
        every = bounds[1] if every is None else join(every, bounds[1])
    return some, every


# exact types only: a user subclass may change the mask_mod, so it takes the exact builder
_RULES = {
    _masks.Causal: _causal,
    _masks.SlidingWindow: _sliding_window,
    _masks.PrefixLM: _prefix_lm,
    _masks.Padding: _padding,
    _masks.Document: _document,
    _masks.And: _combined,
    _masks.Or: _combined,
}


def _bounds(mask, tensors, t: _Tiles):
    rule = _RULES.get(type(mask))
    return None if rule is None else rule(mask, tensors, t)


def tile_classes(mask, batch: int, q_len: int, kv_len: int, device, block_size: int, tensors=None):
    """Closed-form (partial, full), each bool (B or 1, 1, n_q, n_kv); None when `mask` has no closed form.

    tensors: the mask's tensors already on `device` (None: copied here)."""
    t = _Tiles.of(q_len, kv_len, block_size, device)
    bounds = _bounds(mask, mask.tensors_on(device) if tensors is None else tensors, t)
    if bounds is None:
        return None
    rows_b = batch if mask.per_batch else 1
    some, every = (b.expand(rows_b, t.n_q, t.n_kv) for b in bounds)
    full = every & t.inner
    partial = some & ~full
    return partial[:, None], full[:, None]  # (B|1, H=1, n_q, n_kv): heads share the mask


def build_block_mask(mask, batch: int, q_len: int, kv_len: int, device, block_size: int, exact: bool = False):
    """A BlockMask for `mask` at (B, Sq, Skv); B = 1 (broadcast) for masks without per-sequence tensors.

    Tiles are classified in closed form where the mask allows it; `exact=True` (or a mask the
    closed form does not know) evaluates every (query, key) pair instead.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)
    tensors = mask.tensors_on(device)  # one host -> device copy for the tiles and the mask_mod
    with torch.no_grad():
        classes = None if exact else tile_classes(mask, batch, q_len, kv_len, device, block_size, tensors)
        partial, full = classes if classes is not None else block_counts(mask, batch, q_len, kv_len, device, block_size)
        # the backward walks the transposed lists (key block -> query blocks); sorting them here from
        # the tiles we hold is what from_kv_blocks does, minus rebuilding the tiles from the lists.
        # One stack and one sort for all four lists where the tiles are square (few launches on a GPU).
        by_kv, by_q = (partial, full), (partial.transpose(-1, -2), full.transpose(-1, -2))
        if partial.shape[-1] == partial.shape[-2]:
            num, idx = _ordered(torch.stack(by_kv + by_q))  # (4, B|1, 1, n, n)
            kv_num, kv_idx, q_num, q_idx = num[:2], idx[:2], num[2:], idx[2:]
        else:
            (kv_num, kv_idx), (q_num, q_idx) = _ordered(torch.stack(by_kv)), _ordered(torch.stack(by_q))
    mask_mod = mask.mask_mod_for(q_len, kv_len, tensors=tensors)
    try:
        return BlockMask(
            seq_lengths=(q_len, kv_len),
            kv_num_blocks=kv_num[0],
            kv_indices=kv_idx[0],
            full_kv_num_blocks=kv_num[1],
            full_kv_indices=kv_idx[1],
            q_num_blocks=q_num[0],
            q_indices=q_idx[0],
            full_q_num_blocks=q_num[1],
            full_q_indices=q_idx[1],
            BLOCK_SIZE=(block_size, block_size),
            mask_mod=mask_mod,
        )
    except TypeError:  # a torch whose constructor differs: the public classmethod transposes for us
        args = (kv_num[0], kv_idx[0], kv_num[1], kv_idx[1])
        kwargs = dict(BLOCK_SIZE=block_size, mask_mod=mask_mod)
        try:
            return BlockMask.from_kv_blocks(*args, **kwargs, seq_lengths=(q_len, kv_len))
        except TypeError:  # a torch without seq_lengths: lengths are then read from the tensors' shapes
            return BlockMask.from_kv_blocks(*args, **kwargs)
