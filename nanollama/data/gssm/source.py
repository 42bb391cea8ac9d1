"""The GSSM data sources: `data.source=onfly` samples fresh sequences, `files` reads token files.

Both share one config section (GSSMDataConfig: the graph, its seed, the files' path) and one
oracle: every held-out token comes with its exact NLL under the true model (GSSM.nll).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from nanollama.data import seeds
from nanollama.data.config import DataConfig
from nanollama.data.gssm.graph import GSSM, GSSMConfig
from nanollama.data.gssm.stream import build_train_stream
from nanollama.data.source import DataSource
from nanollama.utils.checks import check, is_int


@dataclass
class GSSMDataConfig(DataConfig):
    source: Literal["onfly", "files"] = "onfly"  # onfly: fresh sequences from the graph; files: token files (path)
    path: str | None = None  # source=files: a directory written by `python -m nanollama.data.gssm`
    train_sequences: int | None = None  # a data budget: train on D fixed sequences, repeated (epochs logged)
    graph_seed: int = 0  # draws the GSSM's kernels: one graph shared by runs that differ in `seed`
    gssm: GSSMConfig = field(default_factory=GSSMConfig)

    @property
    def token_vocab_size(self) -> int:
        return self.gssm.vocab_size

    def __post_init__(self):
        super().__post_init__()
        check(self.graph_seed >= 0, "graph_seed", f"must be >= 0, got {self.graph_seed}")
        check(self.graph_seed < 2**63, "graph_seed", f"must be < 2**63 (a 64-bit seed), got {self.graph_seed}")
        check(
            self.train_sequences is None or (is_int(self.train_sequences) and self.train_sequences >= 1),
            "train_sequences",
            f"must be a positive integer (a number of training sequences) or null, got {self.train_sequences!r}",
        )
        check(
            self.source != "files" or bool(self.path),
            "path",
            "data.source=files needs data.path, a directory written by python -m nanollama.data.gssm",
        )


class GSSMSource(DataSource):
    """A GSSM graph (the same on every rank: drawn from graph_seed) and its training stream."""

    cfg: GSSMDataConfig

    def __init__(self, cfg: GSSMDataConfig):
        super().__init__(cfg)
        self.gssm = GSSM(cfg.gssm, seed=cfg.graph_seed)

    @property
    def token_vocab_size(self) -> int:
        return self.gssm.vocab_size

    def train_stream(self, rows: int, seed: int, rank: int, world_size: int, pin_memory: bool = False):
        d = self.cfg
        return build_train_stream(
            d.source,
            gssm=self.gssm,  # onfly samples it; files are checked to come from the same graph
            path=d.path,
            batch_size=rows,
            seq_len=d.seq_len,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=d.num_workers,
            pin_memory=pin_memory,
            train_sequences=d.train_sequences,
        )

    def held_out(self, rows: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        # One seed per eval batch, fixed by the graph seed: every run on this graph sees the same batches.
        # A context graph's oracle needs the batch's sampling seed (its per-sequence kernels).
        s = seeds.derive_seed(self.cfg.graph_seed, seeds.EVAL, index)
        tokens = self.gssm.sample(rows, self.cfg.seq_len + 1, seed=s)
        return tokens, self.gssm.nll(tokens, seed=s), s
