"""The `data` section's fields every source shares; each source subclasses it with its own keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nanollama.utils.checks import check


@dataclass
class DataConfig:
    """Batch shape and layout, common to every data source (`source` picks the subclass: data/registry.py)."""

    source: str = ""
    num_workers: int = 0  # DataLoader workers for the training stream (0: load in the training process)
    batch_size: int = 32  # sequences per micro-step
    seq_len: int = 64  # tokens the model reads per sequence (seq_len + 1 are drawn for the targets)
    mask: Literal["causal", "prefix_lm", "document"] = "causal"  # see nanollama/data/batch.py
    prefix_max: float = 0.5  # prefix_lm: prompt lengths are uniform in [1, prefix_max * seq_len]
    doc_min: int = 8  # document: packed documents have at least doc_min tokens (then an end token)

    @property
    def token_vocab_size(self) -> int | None:
        """Token ids the source emits (end token excluded), when the config alone says so; else None."""
        return None

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary: the source's tokens, plus the end token when documents are packed."""
        tokens = self.token_vocab_size
        return None if tokens is None else tokens + (self.mask == "document")

    def __post_init__(self):
        check(0 < self.prefix_max <= 1, "prefix_max", f"must be in (0, 1], got {self.prefix_max}")
        check(self.doc_min >= 1, "doc_min", f"must be >= 1, got {self.doc_min}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.seq_len >= 1, "seq_len", f"must be >= 1, got {self.seq_len}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
