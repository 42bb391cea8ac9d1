"""A toy model (a bigram table) and a toy data source (a fixed token file, no oracle), written the way
a user adds their own: new code plus one registry line each, nothing in nanollama edited."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from nanollama import data, models
from nanollama.data.config import DataConfig
from nanollama.data.source import DataError, DataSource
from nanollama.models.registry import ModelSpec, seeded_normal
from nanollama.utils.checks import check


@dataclass
class BigramConfig:
    arch: Literal["bigram"] = "bigram"
    vocab_size: int | None = None
    dim: int = 16


class Bigram(nn.Module):
    """logits of token t+1 from token t alone: an embedding and an output projection."""

    def __init__(self, cfg: BigramConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens, mask=None, positions=None, cache=None):
        return self.out(self.embed(tokens)).float()  # (B, S, vocab)


def _initial_value(model: Bigram, name: str, seed: int) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return seeded_normal(model.get_parameter(name).shape, 0.5, seed, names.index(name))


BIGRAM = ModelSpec(
    arch="bigram",
    config=BigramConfig,
    build=Bigram,
    blocks=lambda model: [model.embed, model.out],
    initial_value=_initial_value,
    flops_per_token=lambda model, seq_len: 6.0 * model.config.dim * model.config.vocab_size,
    recompute_flops_per_token=lambda model, seq_len: 2.0 * model.config.dim * model.config.vocab_size,
)


@dataclass
class TokenFileConfig(DataConfig):
    source: Literal["tokenfile"] = "tokenfile"
    path: str = ""  # a .npy file of token ids, one long stream
    held_out_fraction: float = 0.25  # its last part is held out

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.path), "path", "data.source=tokenfile needs data.path, a .npy file of token ids")


class TokenStreamFromFile:
    """Consecutive windows of the training part, in order, rank-interleaved; state: windows taken."""

    def __init__(self, tokens: np.ndarray, rows: int, seq_len: int, rank: int, world_size: int):
        self.tokens, self.rows, self.width = tokens, rows, seq_len + 1
        self.rank, self.world_size, self.index = rank, world_size, 0
        self.windows = len(tokens) // self.width

    def __next__(self) -> torch.Tensor:
        first = (self.index * self.world_size + self.rank) * self.rows
        picks = [(first + r) % self.windows for r in range(self.rows)]
        self.index += 1
        return torch.from_numpy(np.stack([self.tokens[w * self.width : (w + 1) * self.width] for w in picks]))

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"index": self.index, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def restart_resharded(self, state: dict) -> str:
        self.index = -(-state["index"] * state["world_size"] // self.world_size)
        return f"token file continues at window batch {self.index}"

    def close(self) -> None:
        pass


class TokenFileSource(DataSource):
    cfg: TokenFileConfig

    def __init__(self, cfg: TokenFileConfig):
        super().__init__(cfg)
        try:
            tokens = np.load(cfg.path).astype(np.int64)
        except OSError as e:
            raise DataError(f"{cfg.path}: {e}") from None
        split = int(len(tokens) * (1 - cfg.held_out_fraction))
        self.train, self.test = tokens[:split], tokens[split:]
        self._vocab = int(tokens.max()) + 1

    @property
    def token_vocab_size(self) -> int:
        return self._vocab

    def train_stream(self, rows, seed, rank, world_size, pin_memory=False):
        return TokenStreamFromFile(self.train, rows, self.cfg.seq_len, rank, world_size)

    def held_out(self, rows, index):
        stream = TokenStreamFromFile(self.test, rows, self.cfg.seq_len, 0, 1)
        stream.index = index
        return next(stream), None, index  # no oracle: no NLL


def register() -> None:
    """The two registry lines."""
    models.register(BIGRAM)
    data.register("tokenfile", TokenFileConfig, TokenFileSource)
