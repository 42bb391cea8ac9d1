"""The `data` section when data.source=text: corpora, their weights, the tokenizer and the held-out split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanollama.data.config import DataConfig
from nanollama.utils.checks import check


@dataclass
class TextSourceConfig:
    """One corpus: a file, a directory (its .jsonl, .jsonl.gz and .txt files, recursively) or a glob.

    A `stdlib:` prefix is the running Python's standard library directory (e.g. `stdlib:*.py`), so
    a config can name it without knowing the machine. A .jsonl line is one document (its
    `text_field`); any other file is one document.
    """

    path: str = ""
    weight: float = 1.0  # sampling weight among the sources (per document)
    text_field: str = "text"  # the JSONL key holding a document's text

    def __post_init__(self):
        check(bool(self.path), "path", "must name a file, a directory or a glob")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check(bool(self.text_field), "text_field", "must not be empty")


@dataclass
class TextDataConfig(DataConfig):
    source: Literal["text"] = "text"
    mask: Literal["causal", "prefix_lm", "document"] = "document"  # document: attention stays in a document
    sources: list[TextSourceConfig] = field(default_factory=list)  # raw corpora (or `prepared`)
    prepared: str | None = None  # a directory from `python -m nanollama.data.text prepare` (read memory-mapped)
    tokenizer: str = "bytes"  # bytes | sentencepiece:PATH | hf:PATH | tiktoken:NAME
    heldout_fraction: float = 0.01  # documents held out for evaluation (by a hash of their place), unless `heldout`
    heldout: list[TextSourceConfig] = field(default_factory=list)  # a separate held-out corpus instead
    on_bad_record: Literal["skip", "fail"] = "fail"  # a JSONL line that is not JSON or lacks the field
    piece_bytes: int = 8 * 2**20  # a plain .jsonl is sharded in pieces of about this many bytes
    scan: bool = True  # read this rank's files once at start, so bad records fail before the first step

    def __post_init__(self):
        # Real documents have their own lengths: doc_min (the GSSM's drawn document lengths) does not apply.
        # At seq_len, the plug point's rows_needed() is 1, so the trainer asks for batch_size rows.
        self.doc_min = self.seq_len
        super().__post_init__()
        check(
            bool(self.sources) != bool(self.prepared),
            "sources",
            "give data.sources (raw corpora) or data.prepared (a prepared directory), exactly one",
        )
        check(0 <= self.heldout_fraction < 1, "heldout_fraction", f"must be in [0, 1), got {self.heldout_fraction}")
        check(
            bool(self.heldout) or self.heldout_fraction > 0,
            "heldout_fraction",
            "must be > 0 when no data.heldout corpus is given (evaluation needs held-out documents)",
        )
        check(self.piece_bytes >= 4096, "piece_bytes", f"must be >= 4096, got {self.piece_bytes}")
