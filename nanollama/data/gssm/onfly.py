"""On-the-fly GSSM batches: an IterableDataset of fresh token batches, one independent stream per rank.

The ranks interleave one global stream: batch k of rank r is global batch g = k * world_size + r,
`gssm.sample(batch_size, seq_len + 1, seed=derive_seed(seed, ONFLY, g))`. Ranks never share a
seed, and neither do two batches of a rank. Because the data is a function of the global index,
2 ranks with accumulation A see exactly the batches 1 rank sees with accumulation 2A (loss
parity), and a run resumed on another world size can continue the same global stream.

The worker rule (why the position is one integer): with W DataLoader workers, worker w yields the
batches k = start + w, start + w + W, start + w + 2W, ... A DataLoader (in order, its default)
takes one batch from each worker in turn, 0..W-1, so what comes out of it is batch start,
start + 1, start + 2, ... whatever W is, W = 0 included. Resuming is thus "set start to the
number of batches the consumer took", and a resumed run may even change its worker count.

A data budget (`sequences=D`, data.train_sequences): the stream repeats a fixed set of D sequences.
Row i of global batch g is the global sequence s = g * batch_size + i, and it is pool sequence
s mod D. The pool is cut in blocks of POOL_BLOCK sequences, block b sampled with
derive_seed(seed, ONFLY_POOL, b), so the pool of D is the first D of the pool of any larger D
(nested data budgets) and it does not depend on the batch size or world size. D sequences are one
epoch; the rank interleaving and the resume position are those above.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from nanollama.data.seeds import ONFLY, ONFLY_POOL, derive_seed
from nanollama.utils.checks import check_int

POOL_BLOCK = 64  # sequences per sampled block of a data budget's pool
_CACHED_BLOCKS = 256  # per process: a pool of up to 16384 sequences is sampled once


class OnTheFlyDataset(IterableDataset):
    """Endless LongTensor batches (batch_size, seq_len + 1) of GSSM tokens for one rank.

    `gssm` is anything with `sample(batch_size, seq_len, seed)` (a `GSSM`). `start` is the index of
    the first batch to yield (the resume position). Used directly or inside a DataLoader with
    `batch_size=None` (the dataset batches itself) and any number of workers.
    """

    def __init__(
        self,
        gssm: Any,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        sequences: int | None = None,
    ):
        self.gssm = gssm
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.start = check_int("start", start, 0)
        self.sequences = None if sequences is None else check_int("train_sequences", sequences, 1)
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def batch_seed(self, index: int) -> int:
        return derive_seed(self.seed, ONFLY, index * self.world_size + self.rank)

    def batch(self, index: int) -> torch.Tensor:
        """Batch `index` of this rank's stream: tokens (batch_size, seq_len + 1), int64."""
        if self.sequences is None:
            return self.gssm.sample(self.batch_size, self.seq_len + 1, seed=self.batch_seed(index))
        first = (index * self.world_size + self.rank) * self.batch_size  # the batch's first global sequence
        return torch.stack([self.pool_sequence((first + i) % self.sequences) for i in range(self.batch_size)])

    def pool_sequence(self, j: int) -> torch.Tensor:
        """Sequence j of the data budget's fixed pool: (seq_len + 1,) tokens."""
        block, row = divmod(j, POOL_BLOCK)
        tokens = self._blocks.get(block)
        if tokens is None:
            seed = derive_seed(self.seed, ONFLY_POOL, block)
            tokens = self._blocks[block] = self.gssm.sample(POOL_BLOCK, self.seq_len + 1, seed=seed)
            if len(self._blocks) > _CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        return tokens[row]

    def indices(self) -> Iterator[int]:
        """The batch indices this process (or DataLoader worker) yields, by the worker rule above."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield index
            index += workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in self.indices():
            yield self.batch(index)
