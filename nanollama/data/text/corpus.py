"""A corpus as the stream sees it: pieces, and the tokenized documents of a piece from an offset on.

RawCorpus reads and tokenizes a source's files (in the DataLoader worker that owns the piece);
PreparedCorpus (shards.py) reads token shards memory-mapped. Both yield (start, next offset,
tokens or None for a skipped record), and name a document by `key(piece, start)` for the split.
"""

from __future__ import annotations

from collections.abc import Iterator

from nanollama.data.text import files
from nanollama.data.text.config import TextSourceConfig
from nanollama.data.text.tokenizers import Tokenizer


class RawCorpus:
    """One `data.sources` entry: its files, cut into pieces, tokenized on the fly."""

    def __init__(self, cfg: TextSourceConfig, tokenizer: Tokenizer, on_bad_record: str, piece_bytes: int):
        self.name = cfg.path
        self.base, self.files = files.resolve(cfg.path)
        self.pieces = files.pieces(self.files, piece_bytes)
        self.tokenizer, self.text_field, self.on_bad = tokenizer, cfg.text_field, on_bad_record
        self._readers: dict[int, files.PieceReader] = {}

    def reader(self, piece: int) -> files.PieceReader:
        i = self.pieces[piece].file
        if i not in self._readers:
            self._readers[i] = files.PieceReader(self.files[i], self.text_field, self.on_bad)
        return self._readers[i]

    @property
    def bad(self) -> int:
        return sum(r.bad for r in self._readers.values())

    def key(self, piece: int, start: int) -> str:
        f = self.files[self.pieces[piece].file]
        return f"{f.relative_to(self.base).as_posix()}:{start}"

    def docs(self, piece: int, offset: int | None, tokenize: bool = True) -> Iterator[tuple[int, int, object]]:
        for start, nxt, text in self.reader(piece).docs(self.pieces[piece], offset):
            if text is None or not tokenize:
                yield start, nxt, text
            else:
                yield start, nxt, self.tokenizer.encode(text)

    def scan(self, pieces: list[int]) -> int:
        """Read `pieces` once (no tokenizing) so that a bad file fails now; returns the documents found."""
        return sum(1 for p in pieces for _ in self.docs(p, None, tokenize=False))
