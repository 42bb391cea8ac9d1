"""Attention masks: one definition (a FlexAttention mask_mod) serves every backend.

A mask says which keys each query may see. Each mask is written once as a mask_mod,
`mod(b, h, q_idx, kv_idx) -> bool`, and everything else is derived from it:

- `mask.dense(B, Sq, Skv, device)`: boolean (B, Sq, Skv) for SDPA and the reference, made by
  evaluating the mask_mod on broadcast index grids (so flex and dense can never disagree);
- FlexAttention's BlockMask: `block_masks.build_block_mask(mask, ...)` (tiles classified in closed
  form for the built-in masks and their combinations), which imports this module, never the reverse.

Nothing is cached here: `nanollama.kernels.attention.prepare` builds what a backend needs once per
forward, and the model hands that to every layer.

Per-sequence values (prefix lengths, document ids, lengths) are tensors captured by the mask_mod,
so new values never recompile a compiled flex_attention: only shapes are guarded.

When Sq < Skv (decoding, chunked prefill) queries are the last Sq positions of the keys: query i
sits at absolute position i + (Skv - Sq).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's sparse block size


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. Host -> GPU goes through a pinned copy, asynchronously: a plain copy from
    pageable memory may wait for all queued GPU work, once per batch. The pinned buffer comes from
    torch's caching host allocator, which keeps it until the copy is done, and is not the caller's
    tensor, so changing `t` afterwards is harmless. Other directions stay blocking."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Mask(ABC):
    """Base class. Subclasses define `kind`, `_mod(q_len, kv_len, tensors)`, `_tensors()` and `check`."""

    kind: str = "mask"

    # -- what subclasses provide ------------------------------------------------------------
    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    @abstractmethod
    def _mod(self, q_len: int, kv_len: int, tensors: tuple[torch.Tensor, ...]) -> MaskMod:
        """The FlexAttention mask_mod (b, h, q_idx, kv_idx) -> bool, closing over `tensors`."""

    def check(self, batch: int, q_len: int, kv_len: int) -> None:  # noqa: B027 (optional: most masks fit any call)
        """Raise a one-line ValueError when this mask cannot describe a (batch, Sq, Skv) call."""

    # -- derived API ------------------------------------------------------------------------
    @property
    def is_causal(self) -> bool:
        """True for the plain causal mask (lets SDPA and flash use their built-in causal paths)."""
        return False

    @property
    def per_batch(self) -> bool:
        """True when the mask differs between sequences of the batch (it holds per-sequence tensors)."""
        return bool(self._tensors())

    def tensors_on(self, device) -> tuple[torch.Tensor, ...]:
        """This mask's tensors on `device` (copied on every call: prepare once per forward)."""
        device = torch.device(device)
        return tuple(to_device(t, device) for t in self._tensors())

    def mask_mod_for(self, q_len: int, kv_len: int, device=None, tensors=None) -> MaskMod:
        """The FlexAttention mask_mod for a (Sq, Skv) call, over `tensors` (default: ours, on `device`)."""
        if tensors is None:
            tensors = self._tensors() if device is None else self.tensors_on(device)
        return self._mod(q_len, kv_len, tensors)

    @property
    def mask_mod(self) -> MaskMod:
        """The mask_mod for Sq == Skv (the usual training case)."""
        return self._mod(0, 0, self._tensors())

    def evaluate(
        self, batch: int, q_len: int, kv_len: int, device, q_start: int = 0, q_stop: int | None = None, kv_stop=None
    ) -> torch.Tensor:
        """The mask on query rows [q_start, q_stop) x key columns [0, kv_stop) -> bool (B or 1, rows, cols).

        Rows past Sq and columns past Skv are allowed (block padding): they read as False.
        """
        q_stop = q_len if q_stop is None else q_stop
        kv_stop = kv_len if kv_stop is None else kv_stop
        mod = self.mask_mod_for(q_len, kv_len, device)
        b = torch.arange(batch if self.per_batch else 1, device=device)[:, None, None]  # (B, 1, 1)
        h = torch.zeros((), dtype=torch.long, device=device)
        q = torch.arange(q_start, q_stop, device=device)[None, :, None]  # (1, rows, 1)
        kv = torch.arange(kv_stop, device=device)[None, None, :]  # (1, 1, cols)
        if q_stop <= q_len and kv_stop <= kv_len:  # the common case: no full-size & for the padding
            allowed = mod(b, h, q, kv)
        else:  # clamped so tensor lookups stay in range; the padding reads False through `valid`
            allowed = mod(b, h, q.clamp(max=q_len - 1), kv.clamp(max=kv_len - 1)) & (q < q_len) & (kv < kv_len)
        # a mask_mod may ignore an axis (padding ignores queries): broadcast to the full grid
        return allowed.expand(b.shape[0], q_stop - q_start, kv_stop)

    def dense(self, batch: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        """Boolean (B, Sq, Skv), True where query i may attend to key j (an expanded view for B-free masks)."""
        self.check(batch, q_len, kv_len)
        device = torch.device(device if device is not None else "cpu")
        return self.evaluate(batch, q_len, kv_len, device).expand(batch, q_len, kv_len)

    def density(self, batch: int, q_len: int, kv_len: int) -> float:
        """Fraction of (query, key) pairs that are visible."""
        return float(self.dense(batch, q_len, kv_len).float().mean())

    def __and__(self, other: Mask) -> Mask:
        return And(self, other)

    def __or__(self, other: Mask) -> Mask:
        return Or(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind})"


def _shift(q_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Absolute position of query q_idx (queries are the last Sq of Skv positions)."""
    offset = kv_len - q_len
    return q_idx + offset if offset else q_idx


class Causal(Mask):
    """Query i sees key j iff j <= i."""

    kind = "causal"

    @property
    def is_causal(self) -> bool:
        return True

    def _mod(self, q_len, kv_len, tensors):
        def causal_mod(b, h, q_idx, kv_idx):
            return kv_idx <= _shift(q_idx, q_len, kv_len)

        return causal_mod


class SlidingWindow(Mask):
    """Causal, and i - j < window: each query sees itself and the window - 1 keys before it."""

    kind = "sliding_window"

    def __init__(self, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window: window must be a positive int, got {window!r}")
        self.window = window

    def _mod(self, q_len, kv_len, tensors):
        window = self.window

        def sliding_window_mod(b, h, q_idx, kv_idx):
            q = _shift(q_idx, q_len, kv_len)
            return (kv_idx <= q) & (q - kv_idx < window)

        return sliding_window_mod


def _check_vector(name: str, t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: {what} must be a 1-D integer tensor (B,), got {_describe(t)}")
    return t.long()


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] != batch:
        raise ValueError(f"{name}: holds {t.shape[0]} sequences but the attention batch is {batch}")


class PrefixLM(Mask):
    """Query i sees key j iff j <= i or j < prefix_lengths[b] (the prompt is bidirectional)."""

    kind = "prefix_lm"

    def __init__(self, prefix_lengths: torch.Tensor) -> None:
        self.prefix_lengths = _check_vector("prefix_lm", prefix_lengths, "prefix_lengths")

    def _tensors(self):
        return (self.prefix_lengths,)

    def check(self, batch, q_len, kv_len):
        _check_batch("prefix_lm", self.prefix_lengths, batch)

    def _mod(self, q_len, kv_len, tensors):
        (prefix,) = tensors

        def prefix_lm_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= _shift(q_idx, q_len, kv_len)) | (kv_idx < prefix[b])

        return prefix_lm_mod


class Document(Mask):
    """Causal within a document: query i sees key j iff j <= i and ids[b, i] == ids[b, j] (packed sequences)."""

    kind = "document"

    def __init__(self, document_ids: torch.Tensor) -> None:
        t = document_ids
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"document: document_ids must be a 2-D integer tensor (B, S), got {_describe(t)}")
        self.document_ids = t.long()

    def _tensors(self):
        return (self.document_ids,)

    def check(self, batch, q_len, kv_len):
        _check_batch("document", self.document_ids, batch)
        if self.document_ids.shape[1] != kv_len:
            raise ValueError(
                f"document: document_ids has length {self.document_ids.shape[1]} but the keys have length {kv_len}"
            )

    def _mod(self, q_len, kv_len, tensors):
        (ids,) = tensors
        last = ids.shape[1] - 1

        def document_mod(b, h, q_idx, kv_idx):
            q = _shift(q_idx, q_len, kv_len)
            # lookups clamped into range: queries before position 0 (Sq > Skv) and a kernel's padded
            # tail block must not read out of bounds; causality (or the kernel) hides those pairs anyway
            same = ids[b, q.clamp(0, last)] == ids[b, kv_idx.clamp(0, last)]
            return (kv_idx <= q) & same

        return document_mod


class Padding(Mask):
    """Key j is visible iff j < lengths[b] (right padding); no causality by itself."""

    kind = "padding"

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = _check_vector("padding", lengths, "lengths")

    def _tensors(self):
        return (self.lengths,)

    def check(self, batch, q_len, kv_len):
        _check_batch("padding", self.lengths, batch)

    def _mod(self, q_len, kv_len, tensors):
        (lengths,) = tensors

        def padding_mod(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        return padding_mod


class _Combined(Mask):
    op = "?"

    def __init__(self, *parts: Mask) -> None:
        flat: list[Mask] = []
        for p in parts:
            if not isinstance(p, Mask):
                raise TypeError(f"masks combine only with masks, got {type(p).__name__}")
            flat.extend(p.parts if type(p) is type(self) else (p,))  # (a & b) & c -> and(a, b, c)
        self.parts = tuple(flat)
        self.kind = "(" + self.op.join(p.kind for p in self.parts) + ")"

    def check(self, batch, q_len, kv_len):
        for p in self.parts:
            p.check(batch, q_len, kv_len)

    def _tensors(self):
        return tuple(t for p in self.parts for t in p._tensors())

    def _mod(self, q_len, kv_len, tensors):
        mods, i = [], 0
        for p in self.parts:
            n = len(p._tensors())
            mods.append(p._mod(q_len, kv_len, tensors[i : i + n]))
            i += n
        return self._join(mods)


class And(_Combined):
    """Visible iff visible in every part."""

    op = "&"

    @staticmethod
    def _join(mods):
        def and_mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = out & m(b, h, q_idx, kv_idx)
            return out

        return and_mod


class Or(_Combined):
    """Visible iff visible in any part."""

    op = "|"

    @staticmethod
    def _join(mods):
        def or_mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = out | m(b, h, q_idx, kv_idx)
            return out

        return or_mod


def causal() -> Causal:
    return Causal()


def prefix_lm(prefix_lengths: torch.Tensor) -> PrefixLM:
    return PrefixLM(prefix_lengths)


def document(document_ids: torch.Tensor) -> Document:
    return Document(document_ids)


def sliding_window(window: int) -> SlidingWindow:
    return SlidingWindow(window)


def padding(lengths: torch.Tensor) -> Padding:
    return Padding(lengths)
