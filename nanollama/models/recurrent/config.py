"""The fields every recurrent language model shares, validated once; each arch adds its mixer's fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanollama.utils.checks import ConfigError, check


@dataclass
class RecurrentConfig:
    """The LM skeleton's shape (embedding, residual blocks of mixer + gated MLP, output)."""

    vocab_size: int | None = None  # None: from the data source
    dim: int = 128  # residual stream width
    n_layers: int = 2  # residual blocks
    hidden_dim: int | None = None  # gated MLP width; None: about 8/3 * dim, a multiple of 16; 0: no MLP
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the output projection
    max_seq_len: int = 65536  # longest generation (prompt + new tokens); the recurrence itself has no limit

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = 16 * math.ceil(8 * self.dim / 3 / 16)
        check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", f"must be >= 1, got {self.vocab_size}")
        for name in ("dim", "n_layers", "max_seq_len"):
            positive(self, name)
        check(self.hidden_dim >= 0, "hidden_dim", f"must be >= 0 (0: no MLP), got {self.hidden_dim}")
        check(
            math.isfinite(self.norm_eps) and self.norm_eps > 0,
            "norm_eps",
            f"must be > 0 and finite, got {self.norm_eps}",
        )

    def resets_at_documents(self) -> bool:
        """Whether every recurrent layer restarts its state where a packed document starts."""
        return True

    def check_data(self, data) -> None:
        """Refuse a data layout a recurrent state cannot honour (called by TrainConfig with the data section).

        prefix_lm: a recurrence reads left to right and cannot see the rest of the prompt.
        document: fine where the layers reset at each document's first token (position 0).
        """
        mask = getattr(data, "mask", "causal")
        if mask == "prefix_lm":
            raise ConfigError(
                "data.mask",
                f"model.arch={self.arch} cannot train with prefix_lm (a recurrent state cannot see the rest of "
                "a prompt); use causal or document, or model.arch=transformer or hybrid for prefix_lm",
            )
        if mask == "document" and not self.resets_at_documents():
            raise ConfigError(
                "data.mask",
                f"model.arch={self.arch} cannot train with document (its state is not reset at document starts); "
                "use causal",
            )


def positive(cfg, name: str, low: int = 1) -> None:
    value = getattr(cfg, name)
    check(value >= low, name, f"must be >= {low}, got {value}")


def divides(cfg, name: str, whole: str) -> None:
    """cfg.<whole> must be a multiple of cfg.<name> (named by the field `name`)."""
    n, w = getattr(cfg, name), getattr(cfg, whole)
    check(w % n == 0, name, f"must divide {whole}={w}, got {n}")
