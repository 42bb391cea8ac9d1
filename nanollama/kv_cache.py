"""A static, preallocated KV cache for batched generation, and the cached attention step of one layer.

Each layer has its own key and value tensors, (B, Hk, S_max, D) in the model's dtype; `seqlens`
(B,) int32 on the device says how many slots of each sequence are valid. Separate tensors, not views
of one (n_layers, 2, ...) buffer: under torch.compile a write into a view of a graph input is
functionalised into a scatter of the whole base, so one shared buffer costs a copy of every layer's
cache per layer per step. Nothing here reads a tensor back to the host, and no decode step allocates a
tensor whose shape depends on the data, so a decode step traces into one graph under torch.compile
and replays as a CUDA graph (mode="reduce-overhead").

Two phases, chosen by `KVCache.decoding` (a Python bool, so a compiled decode step guards on it once):
- prefill: the model reads right-padded prompts (B, S) with plain causal attention (exact for the
  real tokens: none of them sees a padding token) and writes the K/V of all S slots; slots at or
  past a prompt's length hold padding K/V that decode never reads and later overwrites. Then
  `start_decode(lengths)` sets seqlens to the prompts' lengths, or, after `reset(lengths)`, the
  prefill does so itself and computes logits only at each prompt's last token.
- decode: one token per sequence; sequence b's token sits at position seqlens[b] (RoPE and the
  slot it is written to), attends to slots [0, seqlens[b]], and seqlens advances by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanollama.kernels import apply_rope, decode_attention


@dataclass
class DecodeStep:
    """What every layer of one decode step shares: positions (B, 1) int64 and lengths (B,) int32 after the append."""

    positions: torch.Tensor
    lengths: torch.Tensor


class KVCache:
    """Keys and values of every layer for a batch of B sequences of at most S_max tokens.

    k[i], v[i] (B, Hk, S_max, D) in `dtype` for layer i; seqlens (B,) int32. Build one with
    `KVCache.for_model(model, batch_size, max_len)`; reuse it across generations with `reset()`
    (a compiled decode step stays valid as long as the object and its shapes stay the same).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, v in (("n_layers", n_layers), ("batch_size", batch_size), ("n_kv_heads", n_kv_heads),
                        ("max_len", max_len), ("head_dim", head_dim)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {v!r}")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.decoding = False
        self.prompt_lengths: torch.Tensor | None = None  # set by reset(lengths): see there
        # Static addresses: a CUDA graph replays reads and writes of these very buffers, and
        # torch.compile lets the compiled step mutate them in place without copying them in and out.
        for t in (*self.k, *self.v, self.seqlens):
            torch._dynamo.mark_static_address(t)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for `model` (a nanollama Transformer), in its parameters' dtype and device by default."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, dtype or p.dtype, p.device)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def reset(self, prompt_lengths: torch.Tensor | None = None) -> None:
        """Back to the prefill phase; the old K/V stay in place and are overwritten (never read: seqlens is 0).

        With the prompts' lengths (B,) the next forward, the prefill, returns only the logits of each
        prompt's last token, (B, 1, V) rather than (B, S, V) (which for a 128K vocabulary and long
        prompts is gigabytes), and starts decoding itself. Without them it returns every position's
        logits and the caller calls start_decode.
        """
        self.seqlens.zero_()
        self.decoding = False
        if prompt_lengths is not None:
            self._check_lengths(prompt_lengths, "reset")
            prompt_lengths = prompt_lengths.to(self.seqlens.device)
        self.prompt_lengths = prompt_lengths

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) caches, each (B, Hk, S_max, D)."""
        return self.k[i], self.v[i]

    def fill_(self, value: float) -> None:
        """Set every K/V slot (tests fill unused slots with NaN to prove they are never read)."""
        for t in (*self.k, *self.v):
            t.fill_(value)

    def start_decode(self, lengths: torch.Tensor) -> None:
        """End of prefill: sequence b holds lengths[b] valid tokens (a (B,) integer tensor, any device)."""
        self._check_lengths(lengths, "start_decode")
        self.seqlens.copy_(lengths)  # non-blocking for a device tensor; a host tensor is copied in
        self.decoding = True
        self.prompt_lengths = None

    def _check_lengths(self, lengths: torch.Tensor, where: str) -> None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (self.batch_size,):
            shape = tuple(getattr(lengths, "shape", ()))
            raise ValueError(f"KVCache.{where}: lengths must be a ({self.batch_size},) tensor, got shape {shape}")

    # ------------------------------------------------------------------ used by the model's forward

    def begin_step(self, n_tokens: int) -> DecodeStep | None:
        """Called once per model forward: None in prefill, the shared DecodeStep in decode.

        A sequence already at S_max (one that finished and keeps running in the static batch) has
        its last slot overwritten from then on; its outputs are discarded by the caller.
        """
        if not self.decoding:
            return None
        if n_tokens != 1:
            raise ValueError(f"KVCache: a decode step takes one token per sequence, got {n_tokens}")
        pos = self.seqlens.clamp(max=self.max_len - 1)  # (B,) int32: the slot the new token goes to
        return DecodeStep(positions=pos.long()[:, None], lengths=pos + 1)

    def end_step(self, step: DecodeStep | None, h: torch.Tensor) -> torch.Tensor:
        """Called after the last layer with its output h (B, S, dim); returns the rows the logits are wanted for.

        Decode: every sequence advances by its one token. A prefill after reset(prompt_lengths):
        each prompt's last token only, (B, 1, dim), and the cache switches to decoding.
        """
        if step is not None:
            self.seqlens.copy_(step.lengths)
        elif self.prompt_lengths is not None:
            lengths = self.prompt_lengths
            h = h[torch.arange(h.shape[0], device=h.device), lengths.long() - 1][:, None]  # (B, 1, dim)
            self.start_decode(lengths)
        return h

    def for_layer(self, i: int, step: DecodeStep | None) -> LayerCache:
        return LayerCache(self, i, step)


@dataclass
class LayerCache:
    """Layer `index`'s handle on the cache during one model forward (what Attention.forward receives)."""

    cache: KVCache
    index: int
    step: DecodeStep | None  # None: prefill

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos, sin, attention) -> torch.Tensor:
        """q (B, S, Hq, D), k and v (B, S, Hk, D) before RoPE -> attention output (B, S, Hq, D).

        Prefill: RoPE at positions 0..S-1, K/V written to slots [0, S), then `attention` (the model's
        causal attention over the S tokens, (B, H, S, D) layout). Decode: RoPE at each sequence's own
        position, K/V written at that slot (index_put, one slot per sequence), decode_attention over
        the cache.
        """
        k_cache, v_cache = self.cache.layer(self.index)
        B, S = q.shape[:2]
        step = self.step
        if step is None:
            if S > self.cache.max_len:
                raise ValueError(f"KVCache: prompt length {S} exceeds the cache's max_len={self.cache.max_len}")
            q, k = apply_rope(q, k, cos, sin)
            k_cache[:, :, :S].copy_(k.transpose(1, 2))  # (B, S, Hk, D) -> (B, Hk, S, D)
            v_cache[:, :, :S].copy_(v.transpose(1, 2))
            return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin, step.positions)
        batch = torch.arange(B, device=q.device)
        slot = step.positions[:, 0]
        # Advanced indices on dims 0 and 2 around a slice: the target is (B, Hk, D), one slot per sequence.
        k_cache[batch, :, slot] = k[:, 0]
        v_cache[batch, :, slot] = v[:, 0]
        out = decode_attention(q[:, 0], k_cache, v_cache, step.lengths)  # (B, Hq, D)
        return out[:, None]  # (B, 1, Hq, D)
