"""A static, preallocated KV cache for batched generation: the Transformer's generation state.

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

from nanollama.utils.checks import check_int


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
            check_int(f"KVCache: {name}", v, 1)
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
        heads = model.layers[0].attention.n_kv_heads  # this rank's heads under tensor parallelism
        return cls(cfg.n_layers, batch_size, heads, max_len, cfg.head_dim, dtype or p.dtype, p.device)

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

    # ------------------------------------------------------------------ the generation-state interface
    # What the model's one forward calls: begin(n_tokens) once, step.layer(i).update(k, v) in each
    # attention layer, end(step, h) after the last layer. A recurrent layer's state would implement
    # the same three calls with its own update.

    def begin(self, n_tokens: int) -> CacheStep:
        """Called once per model forward: the step every layer shares (positions None in prefill).

        A sequence already at S_max (one that finished and keeps running in the static batch) has
        its last slot overwritten from then on; its outputs are discarded by the caller.
        """
        if not self.decoding:
            if n_tokens > self.max_len:
                raise ValueError(f"KVCache: prompt length {n_tokens} exceeds the cache's max_len={self.max_len}")
            return CacheStep(self, n_tokens, positions=None, lengths=None)
        if n_tokens != 1:
            raise ValueError(f"KVCache: a decode step takes one token per sequence, got {n_tokens}")
        pos = self.seqlens.clamp(max=self.max_len - 1)  # (B,) int32: the slot the new token goes to
        return CacheStep(self, 1, positions=pos.long()[:, None], lengths=pos + 1)

    def end(self, step: CacheStep, h: torch.Tensor) -> torch.Tensor:
        """Called after the last layer with its output h (B, S, dim); returns the rows the logits are wanted for.

        Decode: every sequence advances by its one token. A prefill after reset(prompt_lengths):
        each prompt's last token only, (B, 1, dim), and the cache switches to decoding.
        """
        if step.lengths is not None:
            self.seqlens.copy_(step.lengths)
        elif self.prompt_lengths is not None:
            lengths = self.prompt_lengths
            h = h[torch.arange(h.shape[0], device=h.device), lengths.long() - 1][:, None]  # (B, 1, dim)
            self.start_decode(lengths)
        return h


@dataclass
class CacheStep:
    """One model forward's view of the cache: the new tokens' RoPE positions and every layer's handle."""

    cache: KVCache
    n_tokens: int
    positions: torch.Tensor | None  # (B, 1) int64 in decode; None in prefill (positions 0..S-1)
    lengths: torch.Tensor | None  # (B,) int32 valid slots after this step's write (decode only)

    @property
    def decoding(self) -> bool:
        return self.positions is not None

    def layer(self, i: int) -> LayerKVCache:
        return LayerKVCache(self, i)


@dataclass
class LayerKVCache:
    """Layer `index`'s cache during one forward: `update` stores the new K/V and returns what to attend to."""

    step: CacheStep
    index: int

    @property
    def decoding(self) -> bool:
        return self.step.decoding

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v (B, S, Hk, D) after RoPE -> (k_cache, v_cache (B, Hk, S_max, D), valid lengths (B,) or None).

        Prefill: written to slots [0, S) (the layer then attends among its S tokens). Decode: written
        at each sequence's own slot (index_put, one slot per sequence), lengths counting it.
        """
        k_cache, v_cache = self.step.cache.layer(self.index)
        step = self.step
        if not step.decoding:
            S = k.shape[1]
            k_cache[:, :, :S].copy_(k.transpose(1, 2))  # (B, S, Hk, D) -> (B, Hk, S, D)
            v_cache[:, :, :S].copy_(v.transpose(1, 2))
            return k_cache, v_cache, None
        batch = torch.arange(k.shape[0], device=k.device)
        slot = step.positions[:, 0]
        # Advanced indices on dims 0 and 2 around a slice: the target is (B, Hk, D), one slot per sequence.
        k_cache[batch, :, slot] = k[:, 0]
        v_cache[batch, :, slot] = v[:, 0]
        return k_cache, v_cache, step.lengths
