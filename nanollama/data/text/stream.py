"""The text training stream: documents from weighted corpora, each followed by the end token, packed into rows.

Consumers: a rank's stream is fed by max(1, num_workers) consumers (its DataLoader workers), and
consumer c = rank * workers + slot owns pieces c, c + C, c + 2C, ... of every corpus (C consumers
in all), so no two read the same bytes and nobody opens another's files. Each consumer walks its
pieces in a per-epoch permutation, picks the corpus of every next document by weight (uniforms
keyed by its document count), and cuts its token stream into rows of seq_len + 1; a batch is
`rows` consecutive rows of one consumer. The DataLoader hands batches out round robin.

State, to the token: every batch carries its consumer's state after it (per corpus: epoch,
piece, byte or document offset; the document being packed: where it starts and how many of its
tokens are out; the document count that keys the sampling), and the stream keeps the last state
of each consumer it took a batch from, plus the number taken. Resuming re-tokenizes the one open
document per consumer and goes on exactly. On another world size (or worker count) every
consumer starts the epoch after the furthest one saved, over the new sharding: deterministic,
and no document is seen twice within an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nanollama.data import seeds
from nanollama.data.batch import Batch
from nanollama.data.source import DataError
from nanollama.data.text import files
from nanollama.kernels import masks

TEXT_ORDER, TEXT_MIX = seeds.TEXT_ORDER, seeds.TEXT_MIX
_BLOCK = 4096


class Cursor:
    """One consumer's place in one corpus: (epoch, k-th of its pieces in that epoch's order, offset in it)."""

    def __init__(self, corpus: Any, index: int, mine: list[int], seed: int, consumer: int, split: tuple[bool, float]):
        self.corpus, self.index, self.mine, self.seed, self.consumer = corpus, index, mine, seed, consumer
        self.want_heldout, self.fraction = split  # train: (False, f) skips held-out documents
        self.epoch, self.k, self.offset = 0, 0, None
        self._it: Iterator | None = None
        self._order: tuple[int, np.ndarray] | None = None

    def order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            key = [self.seed, TEXT_ORDER, self.index, self.consumer, self.epoch]
            self._order = (self.epoch, np.random.default_rng(key).permutation(len(self.mine)))
        return self._order[1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "k": self.k, "offset": self.offset}

    def load(self, state: dict) -> None:
        self.epoch, self.k, self.offset = int(state["epoch"]), int(state["k"]), state["offset"]
        self._it = None

    def next_doc(self) -> np.ndarray:
        barren = 0  # pieces run through without a document: more than all of them is an empty shard
        while True:
            piece = self.mine[int(self.order()[self.k])]
            if self._it is None:
                self._it = self.corpus.docs(piece, self.offset)
            for start, nxt, tokens in self._it:
                self.offset = nxt
                if tokens is None or not len(tokens):
                    continue
                if files.heldout(self.corpus.key(piece, start), self.fraction) != self.want_heldout:
                    continue
                return tokens
            self._it, self.offset, self.k = None, None, self.k + 1
            if self.k == len(self.mine):
                self.epoch, self.k = self.epoch + 1, 0
            barren += 1
            if barren > len(self.mine):
                raise DataError(f"{self.corpus.name}: no training documents in consumer {self.consumer}'s pieces")


class Packer:
    """A consumer's documents (plus end tokens) cut into rows of `row_len` tokens."""

    def __init__(self, cursors: list[Cursor], weights: list[float], seed: int, consumer: int, eos: int, row_len: int):
        self.cursors, self.seed, self.consumer, self.eos, self.row_len = cursors, seed, consumer, eos, row_len
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.docs, self.base_epoch = 0, 0
        self.doc: np.ndarray | None = None
        self.current: dict | None = None  # {"corpus", "at" (its cursor before the document), "pos"}
        self._block: tuple[int, np.ndarray] | None = None

    def _choose(self) -> int:
        if len(self.cursors) == 1:
            return 0
        b = self.docs // _BLOCK
        if self._block is None or self._block[0] != b:
            key = [self.seed, TEXT_MIX, self.consumer, self.base_epoch, b]
            self._block = (b, np.random.default_rng(key).random(_BLOCK))
        u = self._block[1][self.docs % _BLOCK]
        return min(int(np.searchsorted(self.cum, u, side="right")), len(self.cursors) - 1)

    def _next_doc(self) -> None:
        c = self._choose()
        at = self.cursors[c].state()
        self.doc = np.append(self.cursors[c].next_doc(), self.eos)
        self.current = {"corpus": c, "at": at, "pos": 0}
        self.docs += 1

    def rows(self, n: int) -> np.ndarray:
        """The next (n, row_len) int64 tokens."""
        out = np.empty(n * self.row_len, dtype=np.int64)
        filled = 0
        while filled < len(out):
            if self.doc is None or self.current["pos"] == len(self.doc):
                self._next_doc()
            pos = self.current["pos"]
            take = min(len(self.doc) - pos, len(out) - filled)
            out[filled : filled + take] = self.doc[pos : pos + take]
            self.current["pos"], filled = pos + take, filled + take
        return out.reshape(n, self.row_len)

    def state_dict(self) -> dict:
        return {
            "docs": self.docs,
            "base_epoch": self.base_epoch,
            "current": None if self.current is None else {**self.current, "at": dict(self.current["at"])},
            "cursors": [c.state() for c in self.cursors],
        }

    def load_state_dict(self, state: dict) -> None:
        self.docs, self.base_epoch = int(state["docs"]), int(state["base_epoch"])
        for cursor, s in zip(self.cursors, state["cursors"]):
            cursor.load(s)
        cur = state["current"]
        self.doc, self.current = None, None
        if cur is not None:  # re-read the open document, then put its cursor back where it was after it
            cursor = self.cursors[cur["corpus"]]
            after = cursor.state()
            cursor.load(cur["at"])
            self.doc = np.append(cursor.next_doc(), self.eos)
            if cursor.state() != after:
                raise ValueError(f"data stream state: the open document of {cursor.corpus.name} does not re-read")
            self.current = {"corpus": cur["corpus"], "at": dict(cur["at"]), "pos": int(cur["pos"])}

    def restart_at(self, epoch: int) -> None:
        self.docs, self.base_epoch, self.doc, self.current = 0, epoch, None, None
        for c in self.cursors:
            c.load({"epoch": epoch, "k": 0, "offset": None})


def consumer_pieces(corpora: list, consumer: int, consumers: int) -> list[list[int]]:
    return [list(range(len(c.pieces)))[consumer::consumers] for c in corpora]


def build_packer(corpora, weights, seed, consumer, consumers, eos, row_len, fraction) -> Packer:
    owned = consumer_pieces(corpora, consumer, consumers)
    use = [i for i, mine in enumerate(owned) if mine]
    if not use:
        counts = ", ".join(f"{c.name}: {len(c.pieces)}" for c in corpora)
        raise DataError(
            f"{counts} pieces cannot feed {consumers} readers (world size x max(1, data.num_workers)); "
            "use fewer workers, more files, or a smaller data.piece_bytes"
        )
    cursors = [Cursor(corpora[i], i, owned[i], seed, consumer, (False, fraction)) for i in use]
    return Packer(cursors, [weights[i] for i in use], seed, consumer, eos, row_len)


class _Batches(IterableDataset):
    """One rank's batches; in DataLoader worker w it is the consumer of slot (w + rotation) % workers."""

    def __init__(self, stream: TextStream, states: list, rotation: int):
        self.s, self.states, self.rotation = stream, states, rotation

    def __iter__(self):
        s = self.s
        info = get_worker_info()
        slot = ((0 if info is None else info.id) + self.rotation) % s.workers
        consumer = s.rank * s.workers + slot
        packer = build_packer(
            s.corpora, s.weights, s.seed, consumer, s.world_size * s.workers, s.eos, s.seq_len + 1, s.fraction
        )
        if self.states[slot] is not None:
            packer.load_state_dict(self.states[slot])
        elif s.base_epoch:
            packer.restart_at(s.base_epoch)
        while True:
            rows = packer.rows(s.rows)
            yield torch.from_numpy(rows), slot, packer.state_dict()


def _as_is(item):
    return item


class TextStream:
    """(rows, seq_len + 1) int64 batches of packed text for one rank; state: what its consumer took."""

    source = "text"

    def __init__(
        self, corpora, weights, rows, seq_len, seed, rank, world_size, num_workers, pin_memory, eos, fraction, ident
    ):
        self.corpora, self.weights, self.rows, self.seq_len, self.seed = corpora, weights, rows, seq_len, seed
        self.rank, self.world_size, self.num_workers, self.pin_memory = rank, world_size, num_workers, pin_memory
        self.workers = max(1, num_workers)
        self.eos, self.fraction, self.ident = eos, fraction, ident
        self.taken, self.base_epoch = 0, 0
        self.states: list = [None] * self.workers
        self._it = None
        for consumer in range(rank * self.workers, (rank + 1) * self.workers):  # refuse a shard with no pieces now
            build_packer(corpora, weights, seed, consumer, world_size * self.workers, eos, seq_len + 1, fraction)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            data = _Batches(self, list(self.states), self.taken % self.workers)
            loader = DataLoader(
                data, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=_as_is
            )
            self._it = iter(loader)
        tokens, slot, state = next(self._it)
        self.states[slot] = state
        self.taken += 1
        return tokens

    def close(self) -> None:
        self._it = None

    def epochs_seen(self) -> float | None:
        return None  # each consumer has its own epochs over its own pieces

    def _identity(self) -> dict:
        return {"source": self.source, **self.ident, "seed": self.seed, "rows": self.rows, "seq_len": self.seq_len}

    def state_dict(self) -> dict:
        return {
            **self._identity(),
            "world_size": self.world_size,
            "workers": self.workers,
            "taken": self.taken,
            "base_epoch": self.base_epoch,
            "states": list(self.states),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"data stream state: saved with {key}={state.get(key)!r}, this run has {value!r}")
        self.close()
        if int(state["workers"]) != self.workers:  # another worker count shards anew, as another world size does
            self.restart_resharded(state)
            return
        self.taken, self.base_epoch, self.states = int(state["taken"]), int(state["base_epoch"]), list(state["states"])

    def restart_resharded(self, state: dict) -> str:
        saved = [c["epoch"] for s in state["states"] if s is not None for c in s["cursors"]]
        self.close()
        self.base_epoch = max(saved, default=int(state.get("base_epoch", 0))) + 1
        self.taken, self.states = 0, [None] * self.workers
        return f"text stream restarts every reader at epoch {self.base_epoch}, sharded over the new world size"


def lay_out_packed(tokens: torch.Tensor, eos: int) -> Batch:
    """A document-mask Batch from packed rows (B, T + 1): documents end at `eos`, positions restart after it.

    The end token belongs to the document it ends, and it is scored: where a text ends is part of the text.
    """
    B, T1 = tokens.shape
    is_end = tokens == eos  # (B, T + 1)
    doc_ids = torch.cumsum(is_end.long(), dim=1) - is_end.long()  # (B, T + 1)
    idx = torch.arange(T1).expand(B, T1)
    starts = torch.zeros_like(is_end)
    starts[:, 1:] = is_end[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # (B, T + 1): where each token's document starts
    positions = idx - first
    return Batch(tokens[:, :-1], tokens[:, 1:], masks.document(doc_ids[:, :-1]), positions[:, :-1])
