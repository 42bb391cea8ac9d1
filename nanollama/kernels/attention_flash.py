"""The "flash" attention backend: flash-attn's fixed-length and variable-length (packed) kernels.

What it runs, exactly as the float64 reference does (`flash_supports` says why anything else is refused):
- no mask, causal, sliding_window and their `&` combinations: `flash_attn_func` (Sq <= Skv when masked);
- document(ids), alone or `&` causal / sliding_window, self-attention (Sq == Skv): each maximal run
  of equal ids in a row is one packed sequence of `flash_attn_varlen_func`, causal inside it;
- padding(lengths) alone, any Sq and Skv: sequence b packs all Sq queries of row b against its first
  lengths[b] keys, without causality.

Our document rule is "i sees j iff ids equal and j <= i". Where an id comes back after another
document in a row ([0, 0, 1, 0]), runs are not documents: the tokens of each row are then stably
sorted by id (a gather of q, k, v and of the output back), which keeps each document's order, so
causality inside the sorted documents is still exact. A sliding window measures distances in the
original positions, which that sort breaks: document & sliding_window with such ids is refused.

Not expressible (refused): padding & causal or & sliding_window (flash-attn aligns causality to the
last unpadded key of each sequence, our masks to position Skv - 1), document & padding, a document
mask with Sq != Skv, prefix_lm, and `|` combinations.

The packing plan (cumulative sequence offsets, gathers) needs the ids or lengths on the host: one
device-to-host copy (a sync when they live on the GPU), made by `flash_prepare` once per forward
(attention.prepare) and handed to every layer. Under torch.compile tracing there is no host copy:
document and padding masks are refused there (`auto` picks flex or sdpa while tracing anyway).
"""

from __future__ import annotations

import dataclasses

import torch

from nanollama.kernels._triton import constant_to_dynamo, module_found
from nanollama.kernels.masks import And, Causal, Document, Mask, Padding, SlidingWindow, to_device


@constant_to_dynamo  # Dynamo cannot trace find_spec
def flash_available() -> bool:
    return module_found("flash_attn")


def _hardware_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn's kernels cannot take such tensors at all (None: they can)."""
    if not flash_available():
        return "flash-attn is not installed (pip install flash-attn, CUDA only)"
    if device.type != "cuda":
        return "flash-attn runs on CUDA tensors only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, not {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"flash-attn takes head_dim <= 256 and a multiple of 8, not {head_dim}"
    return None


# -- what a mask asks of flash-attn ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """A mask as flash-attn arguments: causal flag, window (None: unbounded), the per-sequence part."""

    causal: bool = False
    window: int | None = None
    document: Document | None = None
    padding: Padding | None = None

    @property
    def window_size(self) -> tuple[int, int]:
        # flash-attn's (left, right): key j visible iff i - left <= j <= i + right (bottom-right aligned)
        return (-1, -1) if self.window is None else (self.window - 1, 0)


def _spec(mask: Mask | None) -> _Spec | str:
    """The flash-attn form of `mask`, or the reason it has none."""
    if mask is None:
        return _Spec()
    causal, window, document, padding = False, None, None, None
    for part in mask.parts if isinstance(mask, And) else (mask,):
        if isinstance(part, Causal):
            causal = True
        elif isinstance(part, SlidingWindow):
            causal, window = True, part.window if window is None else min(window, part.window)
        elif isinstance(part, Document) and document is None:
            document = part
        elif isinstance(part, Padding) and padding is None:
            padding = part
        else:
            return (
                f"flash-attn has no '{mask.kind}' mask (it handles none, causal, sliding_window, "
                "document and padding, combined with &)"
            )
    if document is not None and padding is not None:
        return "flash-attn cannot combine a document mask with padding"
    if padding is not None and causal:
        return (
            "flash-attn aligns causality to each sequence's last unpadded key, our padding & causal/"
            "sliding_window masks to key Skv - 1: they differ"
        )
    return _Spec(causal, window, document, padding)


# -- packing plans, built on the host once per forward ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Arguments of one flash_attn_varlen_func call over the flat (B * S, H, D) tokens."""

    cu_q: torch.Tensor  # int32 (n + 1,): packed sequence i holds packed queries cu_q[i]:cu_q[i + 1]
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    # flat rows packed, in packed order (None: every row, as it is); the output goes back to q_rows
    # and query rows not in q_rows get zeros
    q_rows: torch.Tensor | None = None
    k_rows: torch.Tensor | None = None


def _on(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else to_device(t, device) for t in tensors)  # no stream sync


def _document_plan(ids: torch.Tensor, device: torch.device) -> _Plan:
    """Sequences = runs of equal ids per row (B, S); rows are stably sorted by id when an id recurs."""
    ids = ids.cpu()  # the one host copy
    B, S = ids.shape
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)  # stable: each document keeps its token order
    rows = None
    if (ids[:, 1:] != ids[:, :-1]).sum() != (sorted_ids[:, 1:] != sorted_ids[:, :-1]).sum():
        # more runs than documents (each row has at least as many, so the totals tell): some id
        # recurs after another one, so pack the sorted tokens
        ids = sorted_ids
        rows = (order + torch.arange(B)[:, None] * S).flatten()  # (B * S,) flat token rows
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]  # a row's start is a sequence start too
    cu = torch.cat([starts.flatten().nonzero().squeeze(1), torch.tensor([B * S])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    cu, rows = _on(device, cu, rows)
    return _Plan(cu, cu, longest, longest, q_rows=rows, k_rows=rows)


def _padding_plan(lengths: torch.Tensor, batch: int, q_len: int, kv_len: int, device: torch.device) -> _Plan | None:
    """Sequence b: the Sq queries of row b against its first lengths[b] keys. Rows without a key are
    left out (their output is zero), so no packed sequence is empty. None when no row has a key."""
    lengths = lengths.cpu().clamp(0, kv_len)  # the one host copy
    kept = lengths > 0
    if not kept.any():
        return None
    keys = torch.arange(kv_len)[None, :] < lengths[:, None]  # (B, Skv)
    k_rows = None if keys.all() else keys.flatten().nonzero().squeeze(1)
    q_rows = None if kept.all() else (torch.arange(batch)[kept, None] * q_len + torch.arange(q_len)).flatten()
    lengths = lengths[kept]
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32) * q_len
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    cu_q, cu_k, q_rows, k_rows = _on(device, cu_q, cu_k, q_rows, k_rows)
    return _Plan(cu_q, cu_k, q_len, int(lengths.max()), q_rows=q_rows, k_rows=k_rows)


def _plan(spec: _Spec, batch: int, q_len: int, kv_len: int, device: torch.device) -> _Plan | None:
    """The varlen plan of a document or padding spec (one host copy of the ids or lengths)."""
    device = torch.device(device)
    if spec.document is not None:
        return _document_plan(spec.document.document_ids, device)
    return _padding_plan(spec.padding.lengths, batch, q_len, kv_len, device)


@dataclasses.dataclass(frozen=True)
class FlashPrepared:
    """What flash needs for one (mask, B, Sq, Skv): the mask as arguments and, for varlen, its plan."""

    spec: _Spec
    plan: _Plan | None = None


def flash_prepare(mask: Mask | None, batch: int, q_len: int, kv_len: int, device) -> FlashPrepared | str:
    """flash-attn's arguments for `mask` at (B, Sq, Skv), or why it cannot express the mask exactly.

    No device or dtype checks (`_hardware_reason` makes them), so the tests drive it on the CPU."""
    spec = _spec(mask)
    if isinstance(spec, str):
        return spec
    if spec.document is None and spec.padding is None:
        if spec.causal and q_len > kv_len:
            return "flash-attn's causal alignment needs Sq <= Skv"
        return FlashPrepared(spec)
    if torch.compiler.is_compiling():
        return f"flash-attn needs the '{mask.kind}' mask's values on the host, which a torch.compile trace cannot read"
    if spec.document is not None and q_len != kv_len:
        return f"flash-attn takes a document mask for self-attention only (Sq == Skv), not Sq={q_len}, Skv={kv_len}"
    plan = _plan(spec, batch, q_len, kv_len, device)
    if spec.document is not None and spec.window is not None and plan.q_rows is not None:
        return (
            "flash-attn cannot apply a sliding window to documents whose id recurs after another "
            "document in a row (e.g. ids [0, 0, 1, 0])"
        )
    if plan is None:
        return "flash-attn has nothing to attend to: every padding length is 0"
    return FlashPrepared(spec, plan)


def flash_supports(q: torch.Tensor, k: torch.Tensor, mask: Mask | None) -> str | None:
    """None when flash-attn can run this call exactly, else the reason it cannot."""
    reason = _hardware_reason(q.device, q.dtype, q.shape[-1])
    if reason:
        return reason
    prepared = flash_prepare(mask, q.shape[0], q.shape[2], k.shape[2], q.device)
    return prepared if isinstance(prepared, str) else None


# -- the calls ------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B * S, H, D); free for the model's (B, S, H, D) storage seen through a transpose."""
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B * S, H, D)


def _run(q, k, v, prepared: FlashPrepared, scale: float | None) -> torch.Tensor:
    """The flash-attn calls for a prepared mask (no device checks: tests run it on the CPU)."""
    import flash_attn  # an optional extra, found by flash_available: imported only when it runs

    spec = prepared.spec
    B, Hq, Sq, D = q.shape
    softmax_scale = D**-0.5 if scale is None else float(scale)
    if spec.document is None and spec.padding is None:
        # flash-attn wants (B, S, H, D); a transposed view has a contiguous last dim, which it accepts
        out = flash_attn.flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=softmax_scale,
            causal=spec.causal,  # bottom-right aligned, as our masks are when Sq < Skv
            window_size=spec.window_size,
        )
        return out.transpose(1, 2)  # (B, Hq, Sq, D)
    plan = prepared.plan
    q_flat, k_flat, v_flat = _flat(q), _flat(k), _flat(v)  # (B * S, H, D)
    if plan.q_rows is not None:
        q_flat = q_flat.index_select(0, plan.q_rows)
    if plan.k_rows is not None:
        k_flat, v_flat = k_flat.index_select(0, plan.k_rows), v_flat.index_select(0, plan.k_rows)
    packed = flash_attn.flash_attn_varlen_func(
        q_flat,
        k_flat,
        v_flat,
        plan.cu_q,
        plan.cu_k,
        plan.max_q,
        plan.max_k,
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=spec.causal or spec.document is not None,
        window_size=spec.window_size,
    )  # (packed queries, Hq, D)
    if plan.q_rows is not None:  # back to the flat (B * Sq) rows; rows left out (no visible key) stay zero
        packed = packed.new_zeros(B * Sq, Hq, D).index_copy(0, plan.q_rows, packed)
    return packed.reshape(B, Sq, Hq, D).transpose(1, 2)  # (B, Hq, Sq, D)


def attention_flash(q, k, v, prepared: FlashPrepared, scale: float | None = None) -> torch.Tensor:
    """flash-attn on a mask `flash_prepare` accepted; a RuntimeError says why these tensors cannot run."""
    reason = _hardware_reason(q.device, q.dtype, q.shape[-1])
    if reason:
        raise RuntimeError(f"attention backend 'flash': {reason}")
    return _run(q, k, v, prepared, scale)
