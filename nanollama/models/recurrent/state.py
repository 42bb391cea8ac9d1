"""The generation state of a recurrent (or hybrid) LM: a constant-size state per sequence and layer.

It implements the interface models/transformer/cache.py defines (reset, start_decode, begin, end,
step.layer(i)), so `generate()` runs unchanged. Each recurrent layer keeps a few float32 tensors
(e.g. "h" (B, E) and "conv" (B, W - 1, C)); attention layers of a hybrid use a real KVCache, which
this state owns and drives (positions, lengths, the last-token gather).

Ragged prompts: the prefill reads right-padded prompts (B, S). After `reset(prompt_lengths)` each
recurrent layer sees `valid` (B, S) (t < length) and makes the padded steps identities (h_t = h_{t-1};
its conv keeps the last real inputs), so no state absorbs padding; the prefill then returns each
prompt's last-token output and decoding starts. Without prompt lengths every row is taken as full
length (equal-length prompts only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanollama.models.transformer.cache import KVCache


class RecurrentState:
    """States of every recurrent layer (float32, zeroed at reset) and, for a hybrid, a KVCache."""

    def __init__(self, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        p = next(model.parameters())
        self.attention_index = model.attention_index  # layer index -> index among attention layers
        self.tensors: list[dict[str, torch.Tensor]] = []
        for i, block in enumerate(model.layers):
            shapes = {} if i in self.attention_index else block.mixer.state_shapes(batch_size)
            self.tensors.append({k: torch.zeros(s, dtype=torch.float32, device=p.device) for k, s in shapes.items()})
        self.kv = None
        if self.attention_index:
            c = model.attention_config
            n = len(self.attention_index)
            self.kv = KVCache(n, batch_size, c.n_kv_heads, max_len, c.head_dim, dtype or p.dtype, p.device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=p.device)
        self._max_len = max_len
        self.decoding = False
        self.prompt_lengths: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> RecurrentState:
        return cls(model, batch_size, max_len, dtype)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype if self.kv is not None else torch.float32

    def state_numel(self) -> int:
        """Numbers held per sequence by the recurrent layers (the KV cache of a hybrid not counted)."""
        return sum(t[0].numel() for layer in self.tensors for t in layer.values())

    def reset(self, prompt_lengths: torch.Tensor | None = None) -> None:
        """Back to the prefill phase with zero states (a recurrence reads its state, unlike a KV slot)."""
        for layer in self.tensors:
            for t in layer.values():
                t.zero_()
        self.seqlens.zero_()
        self.decoding = False
        if prompt_lengths is not None:
            if not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.shape != (self.batch_size,):
                raise ValueError(f"RecurrentState.reset: lengths must be a ({self.batch_size},) tensor")
            prompt_lengths = prompt_lengths.to(self.seqlens.device)
        self.prompt_lengths = prompt_lengths
        if self.kv is not None:
            self.kv.reset(prompt_lengths)

    def start_decode(self, lengths: torch.Tensor) -> None:
        """End of a prefill run without prompt lengths (valid only if every prompt filled the width)."""
        self.seqlens.copy_(lengths)
        self.decoding = True
        self.prompt_lengths = None
        if self.kv is not None:
            self.kv.start_decode(lengths)

    def begin(self, n_tokens: int) -> RecurrentStep:
        if self.decoding and n_tokens != 1:
            raise ValueError(f"RecurrentState: a decode step takes one token per sequence, got {n_tokens}")
        kv_step = self.kv.begin(n_tokens) if self.kv is not None else None
        valid = None
        if not self.decoding and self.prompt_lengths is not None:
            t = torch.arange(n_tokens, device=self.seqlens.device)
            valid = t[None, :] < self.prompt_lengths[:, None]  # (B, S)
        return RecurrentStep(self, n_tokens, kv_step, valid)

    def end(self, step: RecurrentStep, h: torch.Tensor) -> torch.Tensor:
        """After the last layer: a prefill after reset(lengths) keeps each prompt's last token (B, 1, dim)."""
        if self.decoding:
            self.seqlens.add_(1)
            if self.kv is not None:
                h = self.kv.end(step.kv_step, h)
            return h
        lengths = self.prompt_lengths
        if self.kv is not None:
            h = self.kv.end(step.kv_step, h)
        elif lengths is not None:
            h = h[torch.arange(h.shape[0], device=h.device), lengths.long() - 1][:, None]  # (B, 1, dim)
        if lengths is not None:
            self.seqlens.copy_(lengths)
            self.decoding = True
            self.prompt_lengths = None
        return h


@dataclass
class RecurrentStep:
    """One forward's view: positions for attention layers, and every layer's handle."""

    state: RecurrentState
    n_tokens: int
    kv_step: object | None
    valid: torch.Tensor | None  # (B, S) bool in a ragged prefill, else None

    @property
    def decoding(self) -> bool:
        return self.state.decoding

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self.kv_step is None else self.kv_step.positions

    def layer(self, i: int):
        if i in self.state.attention_index:
            return self.kv_step.layer(self.state.attention_index[i])
        return LayerState(self, i)


@dataclass
class LayerState:
    """Recurrent layer `index`'s state during one forward: get/set its named tensors."""

    step: RecurrentStep
    index: int

    @property
    def decoding(self) -> bool:
        return self.step.decoding

    @property
    def valid(self) -> torch.Tensor | None:
        return self.step.valid

    def lengths(self, batch_size: int, n_tokens: int, device) -> torch.Tensor:
        """Real tokens per row in this prefill, (B,) int64."""
        lengths = self.step.state.prompt_lengths
        if lengths is None:
            return torch.full((batch_size,), n_tokens, dtype=torch.long, device=device)
        return lengths.long()

    def get(self, name: str) -> torch.Tensor:
        return self.step.state.tensors[self.index][name]

    def set(self, name: str, value: torch.Tensor) -> None:
        self.step.state.tensors[self.index][name].copy_(value)
