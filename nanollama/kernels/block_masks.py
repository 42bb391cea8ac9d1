"""Build FlexAttention BlockMasks eagerly, in bounded memory, without torch.compile.

`create_block_mask` uncompiled materialises all B x H x Sq x Skv booleans at once; compiled, it
costs a compilation per new mask_mod and shape. This builder evaluates the mask on query-block
chunks of at most `_CHUNK_ELEMENTS` booleans, reduces each (block x block) tile to "empty",
"partial" or "full", and hands the result to `BlockMask.from_kv_blocks`. Plain tensor ops only:
the same code runs on the CPU and on CUDA, never recompiles, and is cheap next to a training
step (measured in bench/bench_attention.py).

Tiles past the end of the sequence count as masked, as in create_block_mask, so the last
partial tile is never "full" and the kernel evaluates the mask_mod there.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 26  # booleans evaluated at once (64 MiB)


def _ordered(dense_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n_q, n_kv) 0/1 -> (count (..., n_q), indices (..., n_q, n_kv)) with the visible kv blocks first."""
    dense_blocks = dense_blocks.to(torch.int32)
    counts = dense_blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense_blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_counts(
    mask, batch: int, q_len: int, kv_len: int, device, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile classification: (partial, full), each bool (B or 1, 1, n_q_blocks, n_kv_blocks)."""
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


def build_block_mask(mask, batch: int, q_len: int, kv_len: int, device, block_size: int):
    """A BlockMask for `mask` at (B, Sq, Skv); B = 1 (broadcast) for masks without per-sequence tensors."""
    from torch.nn.attention.flex_attention import BlockMask

    with torch.no_grad():
        partial, full = block_counts(mask, batch, q_len, kv_len, device, block_size)
        kv_num, kv_idx = _ordered(partial)
        full_num, full_idx = _ordered(full)
    mask_mod = mask.mask_mod_for(q_len, kv_len, device)
    try:
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
        )
    except TypeError:  # a torch without seq_lengths: lengths are then read from the tensors' shapes
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod)
