"""A thin Llama-style Transformer: pre-norm blocks of RMSNorm, GQA attention with RoPE, SwiGLU MLP.

Attention and RoPE go through nanollama.kernels, so the fast paths apply without the model knowing.
The model knows nothing of torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollama.kernels import (
    apply_rope,
    attention,
    check_rope_scaling,
    decode_attention,
    masks,
    prepare,
    rope_frequencies,
)
from nanollama.models.registry import seeded_normal
from nanollama.models.transformer.cache import KVCache, LayerKVCache
from nanollama.utils.checks import check


@dataclass
class TransformerConfig:
    """Model shape. vocab_size None means: take it from the data source."""

    arch: Literal["transformer"] = "transformer"  # the model family (nanollama.models registry)
    vocab_size: int | None = None  # None: from the data source (its tokens, + 1 end token for documents)
    dim: int = 128  # residual stream width
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 4  # query heads (head_dim = dim / n_heads, even for RoPE)
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    max_seq_len: int = 256  # longest sequence the RoPE tables cover
    hidden_dim: int | None = None  # None: about 8/3 * dim, rounded up to a multiple of 16
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict | None = None  # e.g. {type: yarn, factor: 4, original_max_seq_len: 256}; see kernels/rope.py
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the output projection

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = 16 * math.ceil(8 * self.dim / 3 / 16)
        check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", f"must be >= 1, got {self.vocab_size}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "hidden_dim"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.dim % self.n_heads == 0, "n_heads", f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        check(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
        )
        check(self.head_dim % 2 == 0, "n_heads", f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        check(
            math.isfinite(self.rope_theta) and self.rope_theta > 0,
            "rope_theta",
            f"must be > 0 and finite, got {self.rope_theta}",
        )
        check(
            math.isfinite(self.norm_eps) and self.norm_eps > 0,
            "norm_eps",
            f"must be > 0 and finite, got {self.norm_eps}",
        )
        self.rope_scaling = check_rope_scaling(self.rope_scaling)  # a ConfigError naming rope_scaling.<key>

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype: the mean of squares is where bf16 hurts.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # One fused projection: q, k and v are strided views of its output.
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, positions=None, cache: LayerKVCache | None = None):
        B, S, _ = x.shape
        qkv = self.wqkv(x).view(B, S, self.n_heads + 2 * self.n_kv_heads, self.head_dim)  # (B, S, Hq+2Hk, D)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)  # (B, S, H*, D) views
        q, k = apply_rope(q, k, cos, sin, positions)
        if cache is not None:
            k_cache, v_cache, lengths = cache.update(k, v)  # (B, Hk, S_max, D) twice, (B,) valid slots
            if cache.decoding:  # one new token per sequence against its own cache prefix
                out = decode_attention(q[:, 0], k_cache, v_cache, lengths)  # (B, Hq, D)
                return self.wo(out.reshape(B, S, -1))
        # (B, S, H, D) -> (B, H, S, D), the layout attention kernels want (a prefill attends among its own tokens)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))  # (B, S, Hq*D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, positions=None, cache: LayerKVCache | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, positions, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        check(cfg.vocab_size is not None, "vocab_size", "must be set (or derived from the data) to build the model")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not saved in checkpoints: derived from the config, and kept in float32 whatever the model dtype.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.reset_parameters()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE tables, e.g. after materialising a model built on the meta device."""
        device = self.tok_embeddings.weight.device
        c = self.config
        self.rope_cos, self.rope_sin = rope_frequencies(
            c.max_seq_len, c.head_dim, c.rope_theta, scaling=c.rope_scaling, device=device
        )

    def initial_value(self, name: str, seed: int = 0, std: float = 0.02) -> torch.Tensor:
        """The initial value of parameter `name`, on the CPU, a function of (seed, name) alone.

        Normal(0, std) matrices, with the residual output projections scaled by 1/sqrt(2 * n_layers)
        (depth-scaled init), and ones for norm gains. Seeding each parameter by its name makes the
        weights independent of the order of creation, the device and how the parameter is sharded.
        """
        p = self.get_parameter(name)
        if p.dim() < 2:
            return torch.ones(p.shape)
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std = std / math.sqrt(2 * self.config.n_layers)
        names = [n for n, _ in self.named_parameters()]
        return seeded_normal(p.shape, std, seed, names.index(name))

    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise every (unsharded) parameter with its `initial_value`."""
        if self.tok_embeddings.weight.is_meta:
            return  # materialised later (distributed.fsdp.init_weights)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self.initial_value(name, seed))

    def forward(
        self, tokens: torch.Tensor, mask=None, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """tokens (B, S) -> logits (B, S, vocab). mask defaults to causal; positions (B, S) or None.

        cache: generation (see cache.py): a prefill of right-padded prompts, or a decode step of one
        token per sequence; positions then come from the cache.
        """
        B, S = tokens.shape
        step = None
        if cache is not None:
            if B != cache.batch_size:
                raise ValueError(f"tokens batch {B} does not match the KV cache's batch_size={cache.batch_size}")
            if cache.max_len > self.config.max_seq_len:  # decode positions index the RoPE table
                raise ValueError(
                    f"KV cache max_len={cache.max_len} exceeds model.max_seq_len={self.config.max_seq_len}"
                )
            step = cache.begin(S)
            positions = step.positions
        elif S > self.config.max_seq_len and positions is None:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        if step is None or not step.decoding:  # decode steps attend through decode_attention, without a mask
            # (B, S) from the tokens: under sequence parallelism h holds only this rank's share of S
            mask = self._prepare_mask(masks.causal() if mask is None else mask, h, (B, S))  # once for every layer
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_cos, self.rope_sin, mask, positions, None if step is None else step.layer(i))
        if cache is not None:
            h = cache.end(step, h)  # a prefill may keep only each prompt's last token
        return self.output(self.norm(h)).float()  # logits in float32 for a stable cross-entropy

    def _prepare_mask(self, mask, h: torch.Tensor, batch_seq: tuple[int, int] | None = None):
        """The mask made ready for attention (backend chosen, BlockMask or dense mask built) at h's shapes."""
        cfg = self.config
        B, S = h.shape[:2] if batch_seq is None else batch_seq
        device = h.device
        # q's dtype is the projection's output: autocast's dtype when autocast is on, else h's
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        grad = torch.is_grad_enabled() and self.layers[0].attention.wqkv.weight.requires_grad
        heads = self.layers[0].attention  # its head counts are the local ones under tensor parallelism
        q_shape, k_shape = (B, heads.n_heads, S, cfg.head_dim), (B, heads.n_kv_heads, S, cfg.head_dim)
        return prepare(mask, q_shape, k_shape, dtype, device, grad)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (tied weights once); embeddings=False leaves out the token embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * L * H * Q * T (the nanoGPT / torchtitan convention).

        N counts the parameters that do matmuls (all but the token embedding lookup; with tied
        embeddings the table is the output matmul and is counted). 6N is forward (2N) plus backward
        (4N); 12 * L * H * Q * T is attention's scores and weighted sum (L layers, H heads, head dim
        Q, context T), forward and backward, without discounting the causal mask.
        """
        c = self.config
        return 6 * self.num_params(embeddings=False) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def recompute_flops_per_token(self, seq_len: int) -> float:
        """Extra FLOPs per token when every block's forward runs twice (full activation checkpointing):
        the blocks' forward matmuls, 2 * N_blocks, and attention's forward, 4 * L * H * Q * T."""
        c = self.config
        block_params = sum(p.numel() for p in self.layers.parameters())
        return 2.0 * block_params + 4.0 * c.n_layers * c.n_heads * c.head_dim * seq_len
