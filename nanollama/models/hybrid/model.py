"""Hybrids: a per-layer pattern of recurrent blocks (R, of kind `recurrent`) and the Transformer's own
attention blocks (A: its Block, RoPE and KV cache, any mask), e.g. pattern "RRA" repeated to n_layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nanollama.kernels import check_rope_scaling
from nanollama.models.hawk import model as hawk
from nanollama.models.mamba2 import model as mamba2
from nanollama.models.mingru import model as mingru
from nanollama.models.minlstm import model as minlstm
from nanollama.models.recurrent import RecurrentConfig, RecurrentLM, ResidualBlock
from nanollama.models.recurrent.config import positive
from nanollama.models.transformer.model import TransformerConfig
from nanollama.utils.checks import check

KINDS = {"mingru": mingru, "minlstm": minlstm, "hawk": hawk, "mamba2": mamba2}
DEFAULT_EXPAND = {"mingru": 1, "minlstm": 1, "hawk": 1, "mamba2": 2}


@dataclass
class HybridConfig(RecurrentConfig):
    arch: Literal["hybrid"] = "hybrid"  # the model family (nanollama.models registry)
    pattern: str = "RRA"  # R: recurrent block, A: attention block; repeated (cycled) to n_layers
    recurrent: Literal["mingru", "minlstm", "hawk", "mamba2"] = "hawk"  # the kind of every R block
    max_seq_len: int = 256  # longest sequence the attention layers' RoPE tables cover
    # attention blocks (as model.arch=transformer)
    n_heads: int = 4  # query heads (head_dim = dim / n_heads, even for RoPE)
    n_kv_heads: int | None = None  # None: as many as n_heads
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict | None = None  # see kernels/rope.py
    # recurrent blocks (each kind reads its own; see model.arch=<kind>)
    expand: int | None = None  # recurrent width = expand * dim; None: the kind's default (mamba2 2, else 1)
    conv_width: int = 4  # hawk, mamba2: temporal conv width, 1..16
    lru_heads: int = 4  # hawk: blocks of the gate matrices
    state_dim: int = 16  # mamba2: N
    ssm_head_dim: int = 16  # mamba2: P
    n_groups: int = 1  # mamba2: G
    chunk_size: int = 64  # mamba2: SSD chunk length

    def __post_init__(self):
        if self.expand is None:
            self.expand = DEFAULT_EXPAND.get(self.recurrent, 1)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        super().__post_init__()
        check(
            bool(self.pattern) and set(self.pattern) <= {"R", "A"},
            "pattern",
            f"must be a non-empty string of R (recurrent) and A (attention) letters, got {self.pattern!r}",
        )
        positive(self, "hidden_dim")  # the attention blocks' MLP
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        self.attention_config()  # validates the attention fields under their own names
        KINDS[self.recurrent].check_fields(self)

    @property
    def layer_kinds(self) -> str:
        return "".join(self.pattern[i % len(self.pattern)] for i in range(self.n_layers))

    def attention_config(self) -> TransformerConfig:
        return TransformerConfig(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            max_seq_len=self.max_seq_len,
            hidden_dim=self.hidden_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            norm_eps=self.norm_eps,
            vocab_size=self.vocab_size,
        )

    def check_data(self, data) -> None:
        """prefix_lm works (attention layers see the whole prompt, recurrent ones read it causally);
        document too: every recurrent kind resets at document starts, the attention blocks take the mask."""


def build(cfg: HybridConfig) -> RecurrentLM:
    kind = KINDS[cfg.recurrent]
    attention = tuple(i for i, c in enumerate(cfg.layer_kinds) if c == "A")
    return RecurrentLM(
        cfg,
        lambda i: ResidualBlock(cfg.dim, cfg.hidden_dim, cfg.norm_eps, kind.make_mixer(cfg), kind.ACTIVATION),
        attention_layers=attention,
        attention_config=cfg.attention_config() if attention else None,
    )
