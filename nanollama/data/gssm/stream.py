"""The trainer's data stream: endless (batch_size, seq_len + 1) LongTensor batches with an exact resume state.

Either source runs in a torch DataLoader (workers, pinned memory). A DataLoader reads ahead, so
what was produced is not what was consumed: a stream counts the batches its consumer took, and
that count is its state. Ranks consume in lock-step (one batch per micro-step), so every rank's
state is the same and the trainer checkpoints rank 0's; loading it on each rank continues each
rank's own stream exactly, with any number of workers.

    stream = build_train_stream(cfg.data.source, gssm=gssm, path=cfg.data.path, ...)
    tokens = next(stream)               # inputs tokens[:, :-1], targets tokens[:, 1:]
    state = stream.state_dict()         # into the checkpoint
    stream.load_state_dict(state)       # on resume, before the first next()
    stream.epochs_seen()                # passes over the training data taken (None: fresh data, no epochs)

A data budget (`train_sequences=D`) makes the training data D fixed sequences: the files' first D
train sequences, or the on-the-fly pool of D (onfly.py). It is part of the stream's identity: a
resumed run cannot change it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader

from nanollama.config import to_dict
from nanollama.data.gssm.onfly import OnTheFlyDataset
from nanollama.data.gssm.reader import TokenFileDataset, as_batch
from nanollama.data.sampler import ShardedShuffleSampler
from nanollama.data.source import DataError
from nanollama.utils.checks import check_int


class _Stream:
    """Iterates DataLoaders opened by `_open()`, counting the batches handed out."""

    source = ""
    _keys: tuple[str, ...] = ()  # state fields a resumed stream must share with the saved one

    def __init__(self, num_workers: int, pin_memory: bool | None):
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._it: Iterator[torch.Tensor] | None = None

    def _loader(self, dataset: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        return iter(DataLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs))

    def __iter__(self) -> _Stream:
        return self

    def close(self) -> None:
        """Stop the DataLoader's workers (the next batch reopens it at the current position)."""
        self._it = None

    def _identity(self) -> dict:
        out = {"source": self.source, **{k: getattr(self, k) for k in self._keys}}
        if self.train_sequences is not None:  # absent otherwise: checkpoints from before the budget still load
            out["train_sequences"] = self.train_sequences
        return out

    train_sequences: int | None = None

    def epochs_seen(self) -> float | None:
        """Passes over the training data consumed so far (fractional); None when there are no epochs."""
        return None

    def _check(self, state: dict) -> None:
        for key, value in self._identity().items():
            if key not in state:
                raise ValueError(f"data stream state: missing '{key}'")
            if state[key] != value:
                raise ValueError(f"data stream state: saved with {key}={state[key]!r}, this run has {value!r}")


class OnTheFlyStream(_Stream):
    """Fresh GSSM batches, forever; state: the number of batches taken (see onfly.py's worker rule)."""

    source = "onfly"
    _keys = ("seed", "batch_size", "seq_len", "world_size")

    def __init__(
        self,
        gssm: Any,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_sequences: int | None = None,
    ):
        super().__init__(num_workers, pin_memory)
        self.dataset = OnTheFlyDataset(gssm, batch_size, seq_len, seed, rank, world_size, sequences=train_sequences)
        self.train_sequences = train_sequences
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.index = 0

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self.dataset.start = self.index
            self._it = self._loader(self.dataset, batch_size=None)  # the dataset yields whole batches
        batch = next(self._it)
        self.index += 1
        return batch

    def epochs_seen(self) -> float | None:
        if self.train_sequences is None:
            return None
        return self.index * self.world_size * self.batch_size / self.train_sequences  # global sequences / D

    def state_dict(self) -> dict:
        return {**self._identity(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        self.close()
        self.index = int(state["index"])

    def restart_resharded(self, state: dict) -> str:
        """Continue a stream saved under another world size: the global batches it consumed are skipped."""
        consumed = int(state["index"]) * int(state["world_size"])
        self.close()
        self.index = -(-consumed // self.world_size)  # ceil: no global batch is seen twice
        return f"on-the-fly stream continues at global batch {self.index * self.world_size} (had {consumed})"


class FileStream(_Stream):
    """Shuffled batches from a split's token file, epoch after epoch; state: (epoch, batches taken in it).

    Each rank reads its shard of every epoch's permutation (sampler.py); an epoch's last
    len(shard) % batch_size sequences are left out so that every batch is full. With
    train_sequences=D only the split's first D sequences are used (each epoch permutes those).
    """

    source = "files"
    _keys = ("seed", "batch_size", "seq_len", "world_size")

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        split: str = "train",
        gssm: Any = None,
        train_sequences: int | None = None,
    ):
        super().__init__(num_workers, pin_memory)
        check_int("batch_size", batch_size, 1)
        check_int("seq_len", seq_len, 1)
        self.dataset = TokenFileDataset(path, split, length=seq_len + 1)
        if gssm is not None:
            check_same_graph(self.dataset.manifest, gssm, path)
        n = len(self.dataset)
        if train_sequences is not None:
            if check_int("train_sequences", train_sequences, 1) > n:
                raise DataError(f"{path}: data.train_sequences={train_sequences}, but the {split} split has {n}")
            n = train_sequences  # the sampler's indices 0..D-1 are the split's first D sequences
        self.train_sequences = train_sequences
        if n < world_size:
            raise DataError(f"{path}: {n} {split} sequences cannot give each of {world_size} ranks one")
        self.sampler = ShardedShuffleSampler(n, seed, rank, world_size, shuffle=True, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{path}: the {split} split's {n} sequences{' (data.train_sequences)' if train_sequences else ''} "
                f"give each of {world_size} ranks {len(self.sampler)}, fewer than batch_size={batch_size}"
            )
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch = 0, 0

    def _open(self) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(self.epoch, self.batch * self.batch_size)
        batches = BatchSampler(self.sampler, self.batch_size, drop_last=True)
        return self._loader(self.dataset, batch_sampler=batches, collate_fn=as_batch)

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._open()
        try:
            batch = next(self._it)
        except StopIteration:  # the epoch is over: the next one has its own permutation
            self.epoch, self.batch = self.epoch + 1, 0
            self._it = self._open()
            batch = next(self._it)
        self.batch += 1
        return batch

    def epochs_seen(self) -> float | None:
        return self.epoch + self.batch / self.batches_per_epoch  # an epoch: the batches of one permutation

    def state_dict(self) -> dict:
        return {**self._identity(), "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"data stream state: batch {batch} of epoch {epoch} is outside the epoch")
        self.close()
        self.epoch, self.batch = epoch, batch

    def restart_resharded(self, state: dict) -> str:
        """Continue a stream saved under another world size: at the start of the next epoch, sharded anew."""
        self.close()
        self.epoch, self.batch = int(state["epoch"]) + 1, 0
        return f"file stream restarts at epoch {self.epoch} (the rest of epoch {state['epoch']} is skipped)"


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj))  # tuples -> lists, as in the manifest


def check_same_graph(manifest: dict, gssm: Any, path: str | Path) -> None:
    """Refuse files sampled from another graph than the run's: its Bayes-optimal loss would be wrong."""
    if manifest["vocab_size"] != gssm.vocab_size:
        raise DataError(
            f"{path}: vocab_size {manifest['vocab_size']} in its manifest, the run's graph has {gssm.vocab_size}"
        )
    if _plain(to_dict(gssm.config)) != manifest["gssm"] or int(gssm.seed) != manifest["graph_seed"]:
        raise DataError(
            f"{path}: written from another GSSM (graph_seed {manifest['graph_seed']}, its config in the manifest) "
            f"than this run's data.gssm with graph_seed {gssm.seed}"
        )


def build_train_stream(
    source: Literal["onfly", "files"],
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    gssm: Any = None,
    path: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    train_sequences: int | None = None,
) -> OnTheFlyStream | FileStream:
    """The training stream for `source`: "onfly" samples `gssm` afresh; "files" reads `path`'s train split.

    For "files", a `gssm` (the run's graph) is checked against the manifest's. `train_sequences=D`:
    train on D fixed sequences, repeated (the files' first D, or an on-the-fly pool of D).
    """
    if source == "onfly":
        if gssm is None:
            raise ValueError("data.source=onfly needs the GSSM to sample from")
        return OnTheFlyStream(
            gssm, batch_size, seq_len, seed, rank, world_size, num_workers, pin_memory, train_sequences
        )
    if source == "files":
        if not path:
            raise ValueError("data.path: data.source=files needs the directory written by nanollama.data.gssm")
        return FileStream(
            path,
            batch_size,
            seq_len,
            seed,
            rank,
            world_size,
            num_workers,
            pin_memory,
            gssm=gssm,
            train_sequences=train_sequences,
        )
    raise ValueError(f"data.source must be onfly or files, got {source!r}")
