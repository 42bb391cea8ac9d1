"""Attention with masks, through one of several backends.

    prepared = prepare(mask, q_shape, k_shape, dtype, device, needs_grad)   # once per forward
    attention(q, k, v, mask=prepared) -> (B, Hq, Sq, D)                      # every layer

q (B, Hq, Sq, D); k and v (B, Hk, Skv, D) with Hq a multiple of Hk (grouped-query attention).
`mask` is None (every query sees every key), a `nanollama.kernels.masks.Mask` (prepared inline, for
standalone calls) or a `PreparedMask` from `prepare` (its backend and artefact reused, nothing
rebuilt: the model prepares once per forward and hands it to every layer). A query row with no
visible key returns zeros, and zero gradients, on every backend (never NaN).

Backends (`BACKENDS`):
- "flex": FlexAttention with the prepared BlockMask; compiled on CUDA (NANOLLAMA_FLEX_COMPILE=
  auto|1|0 changes that; on the CPU it runs eager, unfused, and has no backward in PyTorch).
- "sdpa": scaled_dot_product_attention; its built-in causal path for plain causal masks, the
  prepared dense boolean otherwise.
- "flash": flash-attn (when installed, CUDA, fp16/bf16) for no mask, causal, sliding windows, documents
  (packed sequences, Sq == Skv; & causal or sliding_window) and padding alone, through its varlen
  API for the last two (attention_flash.py; `flash_supports` says why a call is refused).
- "reference": eager math with a float32 softmax (`attention_ref`); handles everything.
- "auto": the fastest backend that supports the call, measured once per key and remembered
  (policy in dispatch.py); NANOLLAMA_ATTENTION=flex|sdpa|flash|reference overrides it.

Non-finite inputs (tested in test_attention.py): a NaN in q gives NaN in its own row, on every
backend, and nowhere else. scale=0 gives the mean of the visible values on every backend. Known
differences: a key that is inf or NaN but hidden from a row by a non-causal mask reaches that row on
sdpa (SDPA adds the boolean mask to the scores, inf + -inf = NaN), not on the reference or flex; and
a NaN value hidden from a row may reach it on every backend (the weighted sum multiplies it by 0:
always on sdpa and the reference, within a partially visible tile on flex). Keep hidden slots finite.
"""

from __future__ import annotations

import torch

from nanollama.kernels import dispatch
from nanollama.kernels.attention_backends import BACKENDS, PreparedMask, build, flex_available, run
from nanollama.kernels.attention_flash import flash_available, flash_supports
from nanollama.kernels.masks import Mask

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v, mask) -> None:
    """One-line ValueErrors for impossible shapes (the shape contract in the module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor (B, H, S, D), got {getattr(t, 'shape', t)}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"attention: k/v (B, Hk, Skv, D) = {tuple(k.shape)} do not match q (B, Hq, Sq, D) = {tuple(q.shape)}"
        )
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}), Hk >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"attention: q, k, v must be float16/bfloat16/float32/float64, got {q.dtype}")
    if mask is not None and not isinstance(mask, (Mask, PreparedMask)):
        raise ValueError(f"attention: mask must be a Mask, a PreparedMask or None, got {type(mask).__name__}")


def prepare(
    mask: Mask | None,
    q_shape: tuple[int, int, int, int],
    k_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device,
    needs_grad: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> PreparedMask:
    """Pick the backend for calls of these shapes, once, and build its artefact from `mask`, once.

    q_shape (B, Hq, Sq, D), k_shape (B, Hk, Skv, D); needs_grad: whether the calls will be
    differentiated (it decides among backends). Traceable by torch.compile (nothing measured there).
    """
    if mask is not None and not isinstance(mask, Mask):
        raise ValueError(f"prepare: mask must be a nanollama.kernels.masks.Mask or None, got {type(mask).__name__}")
    device = torch.device(device)
    if mask is not None:
        mask.check(q_shape[0], q_shape[2], k_shape[2])
    if backend == "auto":
        backend = dispatch.choose_backend(mask, tuple(q_shape), tuple(k_shape), dtype, device, needs_grad, scale)
    elif backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return build(backend, mask, q_shape[0], q_shape[2], k_shape[2], device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | PreparedMask | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q (B, Hq, Sq, D), k and v (B, Hk, Skv, D) -> (B, Hq, Sq, D). See the module docstring.

    With a PreparedMask, `backend` must be "auto" or the prepared one."""
    check_inputs(q, k, v, mask)
    if isinstance(mask, PreparedMask):
        B, Sq, Skv = q.shape[0], q.shape[2], k.shape[2]
        if (mask.batch, mask.q_len, mask.kv_len) != (B, Sq, Skv) or mask.device != q.device:
            raise ValueError(
                f"attention: mask was prepared for (B, Sq, Skv) = {(mask.batch, mask.q_len, mask.kv_len)} on "
                f"{mask.device}, called with {(B, Sq, Skv)} on {q.device}"
            )
        if backend not in ("auto", mask.backend):
            raise ValueError(f"attention: backend {backend!r} differs from the prepared mask's {mask.backend!r}")
        prepared = mask
    else:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        prepared = prepare(mask, q.shape, k.shape, q.dtype, q.device, grad, scale, backend)
    compiled = prepared.backend == "flex" and dispatch.flex_compiled(q.device)
    return run(prepared, q, k, v, scale, compiled)


def attention_ref(q, k, v, mask: Mask | None = None, scale: float | None = None) -> torch.Tensor:
    """Eager attention, float32 softmax (float64 inputs stay float64). Shapes as `attention`."""
    return attention(q, k, v, mask, scale, backend="reference")


__all__ = [
    "BACKENDS",
    "PreparedMask",
    "attention",
    "attention_ref",
    "flash_available",
    "flash_supports",
    "flex_available",
    "prepare",
]
