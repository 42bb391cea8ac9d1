"""A shuffling, rank-sharding, resumable sampler for map-style datasets.

Epoch e's order is a permutation of range(n) drawn from (seed, e) alone, the same on every rank;
rank r of W takes its positions r, r + W, r + 2W, ... With drop_last (the default, so that every
rank takes the same number of steps) the permutation's last n % W items are left out of that
epoch (different ones each epoch); without it the shards are disjoint and cover range(n) exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from nanollama.utils.checks import check_int


class ShardedShuffleSampler(Sampler[int]):
    """Indices of one rank's shard of epoch `epoch`, from position `start` of that shard on.

    State: (epoch, position), position counting the indices of this epoch's shard already taken.
    `state_dict()` counts what this sampler has yielded; inside a DataLoader, which reads ahead,
    the consumer must count what it took instead (`nanollama.data.stream.FileStream` does).
    """

    def __init__(
        self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True
    ):
        for name, value, low in (("n", n, 1), ("seed", seed, 0), ("rank", rank, 0), ("world_size", world_size, 1)):
            check_int(name, value, low)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if drop_last and n < world_size:
            raise ValueError(f"n={n} items cannot give each of world_size={world_size} ranks one")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start, self._yielded = 0, 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of range(n), shared by all ranks."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, in order."""
        order = self.order(epoch)
        if self.drop_last:
            order = order[: self.n - self.n % self.world_size]
        return order[self.rank :: self.world_size]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration yield epoch `epoch`'s shard from position `start` on."""
        if epoch < 0 or not 0 <= start <= len(self):
            raise ValueError(f"epoch must be >= 0 and start in [0, {len(self)}], got epoch={epoch}, start={start}")
        self.epoch, self.start, self._yielded = epoch, start, 0

    def __len__(self) -> int:
        """The length of a whole epoch's shard (the same every epoch)."""
        if self.drop_last:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        self._yielded = 0
        for index in self.shard(self.epoch)[self.start :]:
            self._yielded += 1
            yield int(index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.start + self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))
