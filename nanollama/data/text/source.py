"""`data.source=text`: JSONL / plain-text corpora (or prepared shards) through a tokenizer, packed by document.

Text has no oracle: held-out rows come without a per-token NLL, so evaluation reports eval_loss
alone. The model's vocabulary is the tokenizer's (its end token included): model.vocab_size is
taken from it, and a config that sets another one is refused.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from nanollama.data import seeds
from nanollama.data.batch import Batch
from nanollama.data.source import DataError, DataSource
from nanollama.data.text import files
from nanollama.data.text.config import TextDataConfig
from nanollama.data.text.corpus import RawCorpus
from nanollama.data.text.shards import PreparedCorpus
from nanollama.data.text.stream import TextStream, consumer_pieces, lay_out_packed
from nanollama.data.text.tokenizers import load_tokenizer


class TextSource(DataSource):
    cfg: TextDataConfig

    def __init__(self, cfg: TextDataConfig):
        super().__init__(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.prepared:
            self.corpora = [PreparedCorpus(cfg.prepared, self.tokenizer)]
            self.weights = [1.0]
        else:
            self.corpora = [RawCorpus(s, self.tokenizer, cfg.on_bad_record, cfg.piece_bytes) for s in cfg.sources]
            self.weights = [s.weight for s in cfg.sources]
        self.heldout_corpora = [RawCorpus(s, self.tokenizer, cfg.on_bad_record, cfg.piece_bytes) for s in cfg.heldout]
        # the fraction splits the training corpora only when no separate held-out corpus is given
        self.fraction = 0.0 if cfg.heldout else cfg.heldout_fraction
        self._heldout_rows: list[np.ndarray] = []
        self._heldout_docs = None

    @property
    def token_vocab_size(self) -> int:
        # the plug point adds one end token for data.mask=document; the tokenizer's own is counted already
        return self.tokenizer.vocab_size - (self.cfg.mask == "document")

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_id

    def lay_out(self, tokens: torch.Tensor, seed: int, nll: torch.Tensor | None = None) -> Batch:
        if self.cfg.mask == "document":  # rows hold real documents: their boundaries are the end tokens
            return lay_out_packed(tokens, self.eos)
        return super().lay_out(tokens, seed, nll)

    def train_stream(self, rows: int, seed: int, rank: int, world_size: int, pin_memory: bool = False) -> TextStream:
        d = self.cfg
        workers = max(1, d.num_workers)
        if d.scan:
            self._scan(rank, world_size * workers, workers, rank == 0)
        ident = {"tokenizer": self.tokenizer.spec, "corpora": [c.name for c in self.corpora]}
        return TextStream(
            self.corpora,
            self.weights,
            rows,
            d.seq_len,
            seed,
            rank,
            world_size,
            d.num_workers,
            pin_memory,
            self.eos,
            self.fraction,
            ident,
        )

    def _scan(self, rank: int, consumers: int, workers: int, report: bool) -> None:
        """Read this rank's pieces once, so a bad file or record fails at start (one line, exit 2)."""
        for corpus in self.corpora:
            if isinstance(corpus, RawCorpus):
                mine = sorted(
                    p
                    for c in range(rank * workers, (rank + 1) * workers)
                    for p in consumer_pieces([corpus], c, consumers)[0]
                )
                corpus.scan(mine)
                if corpus.bad and report:
                    print(
                        f"data: skipped {corpus.bad} bad records in {corpus.name} (data.on_bad_record=skip)",
                        file=sys.stderr,
                    )

    def _docs(self):
        """The held-out documents, in a fixed order (corpus by corpus, piece by piece)."""
        corpora = self.heldout_corpora or self.corpora
        for corpus in corpora:
            for piece in range(len(corpus.pieces)):
                for start, _, tokens in corpus.docs(piece, None):
                    if tokens is None or not len(tokens):
                        continue
                    if self.heldout_corpora or files.heldout(corpus.key(piece, start), self.fraction):
                        yield tokens

    def held_out(self, rows: int, index: int) -> tuple[torch.Tensor, None, int]:
        n = rows
        T1 = self.cfg.seq_len + 1
        if self._heldout_docs is None:
            self._heldout_docs, self._buffer = self._docs(), np.zeros(0, dtype=np.int64)
        while len(self._heldout_rows) < (index + 1) * n:
            while len(self._buffer) < T1:
                doc = next(self._heldout_docs, None)
                if doc is None:
                    have = sum(1 for _ in self._heldout_rows)
                    where = "data.heldout" if self.heldout_corpora else f"data.heldout_fraction={self.fraction}"
                    raise DataError(
                        f"{', '.join(c.name for c in (self.heldout_corpora or self.corpora))}: the held-out documents "
                        f"({where}) fill {have} rows of seq_len + 1 = {T1} tokens, evaluation needs "
                        f"{(index + 1) * n} (eval.batches x batch_size): give more held-out text or fewer eval.batches"
                    )
                self._buffer = np.concatenate([self._buffer, doc, [self.eos]])
            self._heldout_rows.append(self._buffer[:T1])
            self._buffer = self._buffer[T1:]
        tokens = torch.from_numpy(np.stack(self._heldout_rows[index * n : (index + 1) * n]))
        return tokens, None, seeds.derive_seed(0, seeds.EVAL, index)
