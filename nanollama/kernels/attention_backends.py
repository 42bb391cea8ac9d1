"""The attention backends (mechanism only) and what each builds from a mask: `PreparedMask`.

Every backend runs as `run(prepared, q, k, v, scale)` on the artefact `build(backend, mask, ...)`
made once for a (mask, B, Sq, Skv, device): a BlockMask for flex, the dense boolean mask and its
row_has_key for sdpa and the reference, the varlen plan for flash. Which backend runs is policy
(dispatch.py); the public entry is attention.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from nanollama.kernels import attention_flash, block_masks
from nanollama.kernels._triton import constant_to_dynamo, module_found
from nanollama.kernels.masks import DEFAULT_BLOCK_SIZE, Mask

BACKENDS = ("flex", "sdpa", "flash", "reference")

FLEX_RECOMPILE_LIMIT = 64
_FLEX_BACKEND = "inductor"  # the tests swap in "eager" to count compiles without paying for inductor


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedMask:
    """A mask made ready for one backend at one (B, Sq, Skv, device): build once per forward, pass to every layer.

    Exactly one artefact is set, by backend: flex -> block_mask; sdpa (unless it uses its built-in
    causal path) and reference -> allowed (B|1, 1, Sq, Skv) and row_has_key (B|1, 1, Sq, 1); flash -> flash.
    """

    backend: str
    mask: Mask | None
    batch: int
    q_len: int
    kv_len: int
    device: torch.device
    block_mask: object | None = None
    allowed: torch.Tensor | None = None
    row_has_key: torch.Tensor | None = None
    flash: attention_flash.FlashPrepared | None = None


@constant_to_dynamo  # Dynamo cannot trace find_spec
def flex_available() -> bool:
    return module_found("torch.nn.attention.flex_attention")


def unsupported(backend: str, mask: Mask | None, q_shape, k_shape, dtype, device, grad: bool) -> str | None:
    """None when `backend` can run this call, else why not (flash builds and drops its plan to know)."""
    if backend == "flex":
        if not flex_available():
            return "this torch has no FlexAttention"
        if grad and device.type == "cpu":
            return "flex has no backward on the CPU"
        return None
    if backend == "flash":
        reason = attention_flash._hardware_reason(device, dtype, q_shape[-1])
        if reason:
            return reason
        prepared = attention_flash.flash_prepare(mask, q_shape[0], q_shape[2], k_shape[2], device)
        return prepared if isinstance(prepared, str) else None
    return None  # sdpa and the reference take every mask


def _dense_rows(mask: Mask, batch: int, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed (B|1, 1, Sq, Skv), row_has_key (B|1, 1, Sq, 1)); rows with no key are opened to every key.

    Opening them keeps every SDPA kernel's softmax finite; their output is zeroed afterwards, so their
    gradients are exactly zero, not NaN. Done unconditionally: asking whether any row is empty would
    cost a host sync (and a graph break).
    """
    rows = mask.evaluate(batch, q_len, kv_len, device)  # (B|1, Sq, Skv)
    has_key = rows.any(dim=-1)  # (B|1, Sq)
    return (rows | ~has_key[..., None])[:, None], has_key[:, None, :, None]


def build(backend: str, mask: Mask | None, batch: int, q_len: int, kv_len: int, device) -> PreparedMask:
    """The artefact `backend` needs for `mask` at (B, Sq, Skv) on `device`."""
    device = torch.device(device)
    fields: dict = {}
    if mask is not None:
        mask.check(batch, q_len, kv_len)
        if backend == "flex":
            fields["block_mask"] = block_masks.build_block_mask(mask, batch, q_len, kv_len, device, DEFAULT_BLOCK_SIZE)
        elif backend == "reference" or (backend == "sdpa" and not (mask.is_causal and q_len == kv_len)):
            fields["allowed"], fields["row_has_key"] = _dense_rows(mask, batch, q_len, kv_len, device)
    if backend == "flash":
        flash = attention_flash.flash_prepare(mask, batch, q_len, kv_len, device)
        if isinstance(flash, str):
            raise RuntimeError(f"attention backend 'flash': {flash}")
        fields["flash"] = flash
    return PreparedMask(backend, mask, batch, q_len, kv_len, device, **fields)


# -- shared helpers -------------------------------------------------------------------------------
def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, S, D) -> (B, Hk * groups, S, D), each kv head repeated for its query heads."""
    if groups == 1:
        return x
    B, Hk, S, D = x.shape
    return x[:, :, None].expand(B, Hk, groups, S, D).reshape(B, Hk * groups, S, D)


# -- the backends ---------------------------------------------------------------------------------
def _reference(q, k, v, allowed, has_key, scale) -> torch.Tensor:
    """Eager math, float32 softmax (float64 inputs stay float64); allowed/has_key None: no mask."""
    Hq = q.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = _expand_kv(k, Hq // k.shape[1]).to(compute)  # (B, Hq, Skv, D)
    v = _expand_kv(v, Hq // v.shape[1]).to(compute)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * _scale(q, scale)  # (B, Hq, Sq, Skv)
    if allowed is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
    # `allowed` has empty rows opened (see _dense_rows): softmax over their finite scores, then zeroed
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(probs, v).masked_fill(~has_key, 0.0).to(q.dtype)


def _sdpa(q, k, v, p: PreparedMask, scale) -> torch.Tensor:
    Hq, Hk = q.shape[1], k.shape[1]
    if scale is not None and float(scale) == 0.0:
        # SDPA's causal path returns NaN for scale=0 (torch 2.13); zero scores through q give the
        # reference's answer, the mean of the visible values (and NaN where q holds inf or NaN, as there)
        q, scale = q * 0.0, 1.0
    if p.allowed is None:  # no mask, or plain causal with Sq == Skv: SDPA's built-in paths
        return F.scaled_dot_product_attention(q, k, v, is_causal=p.mask is not None, scale=scale, enable_gqa=Hq != Hk)
    # the fused kernels take GQA badly with a mask: give them full heads
    k, v = _expand_kv(k, Hq // Hk), _expand_kv(v, Hq // Hk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=p.allowed, scale=scale)
    return out.masked_fill(~p.row_has_key, 0.0)


def _flex_fn(compiled: bool):
    """flex_attention, or its one compiled wrapper (torch.compile keeps one cache per wrapped function)."""
    from torch.nn.attention.flex_attention import flex_attention  # loads torch._dynamo: only when flex runs

    if not compiled:
        return flex_attention
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None or _COMPILED_FLEX[0] != _FLEX_BACKEND:
        # Every compiled call shares one Dynamo cache, with an entry per (mask kind, Sq, Skv, grad
        # mode): training plus evaluation at a few lengths passes Dynamo's default limit of 8, after
        # which flex silently runs unfused (O(S^2) memory). Raise the limit, never lower it.
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), FLEX_RECOMPILE_LIMIT))
                break
        # dynamic=False: one kernel per shape; new mask tensors (same shapes) reuse it
        _COMPILED_FLEX = (_FLEX_BACKEND, torch.compile(flex_attention, dynamic=False, backend=_FLEX_BACKEND))
    return _COMPILED_FLEX[1]


_COMPILED_FLEX = None  # (backend name, the compiled flex_attention): one wrapper, hence one Dynamo cache


def _flex(q, k, v, p: PreparedMask, scale, compiled: bool) -> torch.Tensor:
    if not flex_available():
        raise RuntimeError(
            f"attention backend 'flex' needs torch >= 2.5 with FlexAttention; this is {torch.__version__}"
        )
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "attention backend 'flex' has no backward on the CPU (PyTorch limitation): "
            "use backend='sdpa' or 'reference' for CPU training, or run under torch.no_grad()"
        )
    fn = _flex_fn(compiled)
    return fn(q, k, v, block_mask=p.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def run(p: PreparedMask, q, k, v, scale: float | None, flex_compiled: bool = False) -> torch.Tensor:
    """Run p.backend on its prepared artefact; flex_compiled: flex through torch.compile."""
    if p.backend == "flex":
        return _flex(q, k, v, p, scale, flex_compiled)
    if p.backend == "sdpa":
        return _sdpa(q, k, v, p, scale)
    if p.backend == "flash":
        return attention_flash.attention_flash(q, k, v, p.flash, scale)
    return _reference(q, k, v, p.allowed, p.row_has_key, scale)
