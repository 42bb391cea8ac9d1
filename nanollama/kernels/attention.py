"""Attention with masks, through one of several backends.

    attention(q, k, v, mask=None, scale=None, backend="auto") -> (B, Hq, Sq, D)

q (B, Hq, Sq, D); k and v (B, Hk, Skv, D) with Hq a multiple of Hk (grouped-query attention).
`mask` is a `nanollama.kernels.masks.Mask` (None: every query sees every key). A query row with
no visible key returns zeros, and zero gradients, on every backend (never NaN).

Backends (`BACKENDS`):
- "flex": FlexAttention with the mask's cached BlockMask; compiled on CUDA (NANOLLAMA_FLEX_COMPILE=
  auto|1|0 changes that; on the CPU it runs eager, unfused, and has no backward in PyTorch).
- "sdpa": scaled_dot_product_attention; its built-in causal path for plain causal masks, the
  mask's cached dense boolean otherwise.
- "flash": flash-attn (when installed, CUDA, fp16/bf16) for no mask, causal, sliding windows, documents
  (packed sequences, Sq == Skv; & causal or sliding_window) and padding alone, through its varlen
  API for the last two (attention_flash.py; `flash_supports` says why a call is refused).
- "reference": eager math with a float32 softmax (`attention_ref`); handles everything.
- "auto": the fastest backend that supports the call, measured once per (mask kind, shape
  bucket, dtype, device, needs-grad) and cached on disk (see attention_select.py);
  NANOLLAMA_ATTENTION=flex|sdpa|flash|reference overrides it.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from nanollama.kernels.attention_flash import attention_flash, flash_available, flash_supports
from nanollama.kernels.dispatch import module_found
from nanollama.kernels.masks import Mask

BACKENDS = ("flex", "sdpa", "flash", "reference")


# -- shared helpers -------------------------------------------------------------------------------
def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, S, D) -> (B, Hk * groups, S, D), each kv head repeated for its query heads."""
    if groups == 1:
        return x
    B, Hk, S, D = x.shape
    return x[:, :, None].expand(B, Hk, groups, S, D).reshape(B, Hk * groups, S, D)


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
    if Hq % k.shape[1]:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and not isinstance(mask, Mask):
        raise ValueError(f"attention: mask must be a nanollama.kernels.masks.Mask or None, got {type(mask).__name__}")


def _visible_rows(mask: Mask, B: int, Sq: int, Skv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed (B, 1, Sq, Skv), row_has_key (B, 1, Sq, 1)) for SDPA, cached on the mask.

    Rows with no visible key are opened to every key (so softmax stays finite whatever the SDPA
    kernel) and their output is zeroed afterwards: their gradients are then exactly zero, not NaN.
    Done unconditionally: asking whether any row is empty would cost a host sync (and a graph break).
    """

    def build():
        allowed = mask.dense(B, Sq, Skv, device)  # (B, Sq, Skv)
        has_key = allowed.any(dim=-1)  # (B, Sq)
        return (allowed | ~has_key[..., None])[:, None], has_key[:, None, :, None]

    return mask.cached(("sdpa", B, Sq, Skv, torch.device(device)), build)


# -- reference ------------------------------------------------------------------------------------
def attention_ref(q, k, v, mask: Mask | None = None, scale: float | None = None) -> torch.Tensor:
    """Eager attention, float32 softmax (float64 inputs stay float64). Shapes as `attention`."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = _expand_kv(k, Hq // k.shape[1]).to(compute)  # (B, Hq, Skv, D)
    v = _expand_kv(v, Hq // v.shape[1]).to(compute)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * _scale(q, scale)  # (B, Hq, Sq, Skv)
    if mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
    allowed = mask.dense(B, Sq, Skv, q.device)[:, None]  # (B, 1, Sq, Skv)
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
    # empty rows: softmax over finite zeros, then multiplied by 0 -> zero output and zero gradient
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.matmul(probs, v).to(q.dtype)


# -- sdpa -----------------------------------------------------------------------------------------
def attention_sdpa(q, k, v, mask: Mask | None = None, scale: float | None = None) -> torch.Tensor:
    B, Hq, Sq, _ = q.shape
    Hk, Skv = k.shape[1], k.shape[2]
    if mask is None or (mask.is_causal and Sq == Skv):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None, scale=scale, enable_gqa=Hq != Hk)
    allowed, has_key = _visible_rows(mask, B, Sq, Skv, q.device)
    # the fused kernels take GQA badly with a mask: give them full heads
    k, v = _expand_kv(k, Hq // Hk), _expand_kv(v, Hq // Hk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(~has_key, 0.0)


# -- flex -----------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result  # a constant to Dynamo, which cannot trace find_spec
def flex_available() -> bool:
    return module_found("torch.nn.attention.flex_attention")


def flex_compiled(device: torch.device) -> bool:
    """Whether flex runs compiled on this device: NANOLLAMA_FLEX_COMPILE=auto (CUDA only) | 1 | 0."""
    value = os.environ.get("NANOLLAMA_FLEX_COMPILE", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"NANOLLAMA_FLEX_COMPILE must be auto, 0 or 1; got {value!r}")
    return device.type == "cuda" if value == "auto" else value == "1"


FLEX_RECOMPILE_LIMIT = 64
_FLEX_BACKEND = "inductor"  # the tests swap in "eager" to count compiles without paying for inductor


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    # Every compiled call site of flex_attention shares one Dynamo cache, with an entry per (mask
    # kind, Sq, Skv, grad mode): training plus evaluation at a few lengths passes Dynamo's default
    # limit of 8, after which flex silently runs unfused (O(S^2) memory). Raise the limit, never lower it.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), FLEX_RECOMPILE_LIMIT))
            break
    # dynamic=False: one kernel per shape; new mask tensors (same shapes) reuse it
    return torch.compile(flex_attention, dynamic=False, backend=_FLEX_BACKEND)


def attention_flex(q, k, v, mask: Mask | None = None, scale: float | None = None) -> torch.Tensor:
    if not flex_available():
        raise RuntimeError(
            f"attention backend 'flex' needs torch >= 2.5 with FlexAttention; this is {torch.__version__}"
        )
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "attention backend 'flex' has no backward on the CPU (PyTorch limitation): "
            "use backend='sdpa' or 'reference' for CPU training, or run under torch.no_grad()"
        )
    B, Hq, Sq, _ = q.shape
    Hk, Skv = k.shape[1], k.shape[2]
    block_mask = None if mask is None else mask.block_mask(B, Sq, Skv, q.device)
    fn = _flex_fn(flex_compiled(q.device))
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=Hq != Hk)


_IMPLS = {"flex": attention_flex, "sdpa": attention_sdpa, "flash": attention_flash, "reference": attention_ref}


def run_backend(backend: str, q, k, v, mask: Mask | None, scale: float | None) -> torch.Tensor:
    return _IMPLS[backend](q, k, v, mask, scale)


# -- public entry ---------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q (B, Hq, Sq, D), k and v (B, Hk, Skv, D) -> (B, Hq, Sq, D). See the module docstring."""
    from nanollama.kernels.attention_select import choose_backend

    check_inputs(q, k, v, mask)
    if mask is not None:
        mask.check(q.shape[0], q.shape[2], k.shape[2])
    if backend == "auto":
        backend = choose_backend(q, k, v, mask, scale)
    elif backend not in _IMPLS:
        raise ValueError(f"attention: backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return _IMPLS[backend](q, k, v, mask, scale)


__all__ = [
    "BACKENDS",
    "attention",
    "attention_ref",
    "attention_sdpa",
    "attention_flex",
    "attention_flash",
    "flash_available",
    "flash_supports",
]
