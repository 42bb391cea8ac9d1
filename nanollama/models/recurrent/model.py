"""The recurrent LM skeleton every recurrent arch (and the hybrid) builds on: embedding, a stack of
blocks (recurrent ResidualBlocks, or the Transformer's own attention Block in a hybrid), final norm,
output. Per-parameter seeded initialisation, parameter and FLOP counts live here once."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from nanollama.kernels import masks, prepare, rope_frequencies
from nanollama.models.recurrent.state import RecurrentState
from nanollama.models.registry import seeded_normal
from nanollama.models.transformer.model import Block, RMSNorm, TransformerConfig
from nanollama.utils.checks import check

# Residual output projections: depth-scaled at init like the Transformer's wo / w2.
_RESIDUAL_OUT = ("mixer.out_proj.weight", "feed_forward.w2.weight", "attention.wo.weight")


def seeded_uniform(shape, low: float, high: float, seed: int, index: int) -> torch.Tensor:
    """Uniform(low, high) from a generator seeded by (seed, index), like registry.seeded_normal."""
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    return torch.empty(shape).uniform_(low, high, generator=generator)


class RecurrentLM(nn.Module):
    """tokens (B, S) -> logits (B, S, vocab) through `cfg.n_layers` blocks.

    make_mixer(i) builds layer i's recurrent mixer; layers listed in `attention_layers` are the
    Transformer's Block instead, configured by `attention_config` (a TransformerConfig).
    """

    def __init__(
        self,
        cfg,
        make_block: Callable[[int], nn.Module],
        attention_layers: tuple[int, ...] = (),
        attention_config: TransformerConfig | None = None,
    ):
        super().__init__()
        check(cfg.vocab_size is not None, "vocab_size", "must be set (or derived from the data) to build the model")
        self.config = cfg
        self.attention_config = attention_config
        self.attention_index = {layer: j for j, layer in enumerate(attention_layers)}
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(attention_config) if i in self.attention_index else make_block(i) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.reset_parameters()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def reset_buffers(self) -> None:
        c = self.attention_config
        if c is not None:  # RoPE tables for the attention layers only
            device = self.tok_embeddings.weight.device
            self.rope_cos, self.rope_sin = rope_frequencies(
                c.max_seq_len, c.head_dim, c.rope_theta, scaling=c.rope_scaling, device=device
            )

    # ------------------------------------------------------------------ initialisation

    def initial_value(self, name: str, seed: int = 0, std: float = 0.02) -> torch.Tensor:
        """Parameter `name`'s initial value on the CPU, a function of (seed, name) alone.

        A mixer may give its own (gates' decay rates, dt biases, ...); otherwise norm gains are ones,
        other vectors zeros, convolutions Uniform(+-1/sqrt(width)), matrices Normal(0, 0.02) with the
        residual output projections scaled by 1/sqrt(2 * n_layers).
        """
        p = self.get_parameter(name)
        names = [n for n, _ in self.named_parameters()]
        index = names.index(name)
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] == "mixer":
            mixer = self.layers[int(parts[1])].mixer
            own = mixer.initial_value(".".join(parts[3:]), p.shape, seed, index)
            if own is not None:
                return own
        if p.dim() == 1:
            return torch.ones(p.shape) if "norm" in name.split(".")[-2] else torch.zeros(p.shape)
        if p.dim() == 3:  # a depthwise conv (C, 1, W)
            bound = 1.0 / math.sqrt(p.shape[-1])
            return seeded_uniform(p.shape, -bound, bound, seed, index)
        if name.endswith(_RESIDUAL_OUT):
            std = std / math.sqrt(2 * self.config.n_layers)
        return seeded_normal(p.shape, std, seed, index)

    def reset_parameters(self, seed: int = 0) -> None:
        if self.tok_embeddings.weight.is_meta:
            return  # materialised later (distributed.fsdp.init_weights)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self.initial_value(name, seed))

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, mask=None, positions=None, cache: RecurrentState | None = None):
        """tokens (B, S) -> logits (B, S, vocab) in float32. mask/positions reach attention layers only
        (config-time checks refuse masks a recurrence cannot honour). cache: a RecurrentState."""
        B, S = tokens.shape
        step = None
        if cache is not None:
            if B != cache.batch_size:
                raise ValueError(f"tokens batch {B} does not match the state's batch_size={cache.batch_size}")
            step = cache.begin(S)
            positions = step.positions
        elif self.attention_config is not None and S > self.config.max_seq_len and positions is None:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        if self.attention_index and (step is None or not step.decoding):
            mask = self._prepare_mask(masks.causal() if mask is None else mask, h)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_cos, self.rope_sin, mask, positions, None if step is None else step.layer(i))
        if cache is not None:
            h = cache.end(step, h)
        return self.output(self.norm(h)).float()

    def _prepare_mask(self, mask, h: torch.Tensor):
        c = self.attention_config
        B, S = h.shape[:2]
        device = h.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        first = self.layers[next(iter(self.attention_index))]
        grad = torch.is_grad_enabled() and first.attention.wqkv.weight.requires_grad
        return prepare(mask, (B, c.n_heads, S, c.head_dim), (B, c.n_kv_heads, S, c.head_dim), dtype, device, grad)

    # ------------------------------------------------------------------ counts

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def _attention_flops(self, seq_len: int) -> float:
        """Attention scores and weighted sum of one forward per token, 4 * H * Q * T per attention layer."""
        c = self.attention_config
        return 0.0 if c is None else 4.0 * len(self.attention_index) * c.n_heads * c.head_dim * seq_len

    def _scan_flops(self) -> float:
        """The recurrences' elementwise forward FLOPs per token (small beside the matmuls)."""
        return float(sum(b.mixer.scan_flops() for i, b in enumerate(self.layers) if i not in self.attention_index))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (N: matmul parameters, embedding lookup excluded) + 3x the
        forward scan and attention FLOPs (forward + twice as much backward)."""
        return 6.0 * self.num_params(embeddings=False) + 3.0 * (self._scan_flops() + self._attention_flops(seq_len))

    def recompute_flops_per_token(self, seq_len: int) -> float:
        """Extra FLOPs per token when every block's forward runs twice (full activation checkpointing)."""
        block_params = sum(p.numel() for p in self.layers.parameters())
        return 2.0 * block_params + self._scan_flops() + self._attention_flops(seq_len)

    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence (all recurrent layers; no KV cache)."""
        return sum(
            math.prod(s[1:])
            for i, b in enumerate(self.layers)
            if i not in self.attention_index
            for s in b.mixer.state_shapes(1).values()
        )
