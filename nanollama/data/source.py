"""The data plug point: what the trainer asks of any data source.

A source turns its config section into token rows: an endless, resumable training stream per
(rank, world size) and fixed held-out rows. Where an oracle exists (GSSM) the held-out rows carry
the exact NLL of every token, and evaluation reports the Bayes-optimal loss and the excess over
it; a source without one returns None and those fields are simply absent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from nanollama.data.batch import Batch, lay_out_for
from nanollama.data.config import DataConfig


class DataError(ValueError):
    """A data file or directory that cannot be used: reported in one line, exit code 2."""


class TokenStream(Iterator[torch.Tensor]):
    """Endless (rows, seq_len + 1) int64 token batches with an exact resume state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def restart_resharded(self, state: dict) -> str:
        """Continue a stream saved under another world size; returns what the log should say."""
        ...

    def close(self) -> None: ...


class DataSource(ABC):
    """One configured data source (`data.source`): its vocabulary, training stream and held-out rows."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    @property
    @abstractmethod
    def token_vocab_size(self) -> int:
        """Token ids the source emits, 0..token_vocab_size - 1; document packing adds one end token after them."""

    @property
    def vocab_size(self) -> int:
        return self.token_vocab_size + (self.cfg.mask == "document")

    @property
    def eos(self) -> int:
        """The end token packed after each document (data.mask=document)."""
        return self.token_vocab_size

    def lay_out(self, tokens: torch.Tensor, seed: int, nll: torch.Tensor | None = None) -> Batch:
        """A Batch from this source's rows for data.mask (`seed` draws prompt or document lengths)."""
        return lay_out_for(self.cfg, tokens, seed, self.eos, nll=nll)

    @abstractmethod
    def train_stream(self, rows: int, seed: int, rank: int, world_size: int, pin_memory: bool = False) -> TokenStream:
        """Rank `rank`'s stream of (rows, seq_len + 1) batches; `seed` is the run's seed."""

    @abstractmethod
    def held_out(self, rows: int, index: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Held-out batch `index`: tokens (rows, seq_len + 1), their exact NLL of the same shape (or None),
        and the seed that draws its prompt or document lengths.

        The same for every run on this source (a function of the source's config and `index`).
        """
