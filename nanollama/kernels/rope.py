"""Rotary position embeddings: a fused rotation of q and k (tables and scaling: rope_scaling.py).

Layers, top to bottom: `apply_rope` (public; checks the inputs once and dispatches to the Triton
path or the eager reference), then one route to the kernel, eager and traced alike: `_Rope`, an
autograd.Function whose forward and backward call the `nanollama::rope` torch op (with a fake impl,
so torch.compile traces it), as flash-attention's interface does. Below them the launcher
`_launch_rope` (one launch for q and k), the `_rope_kernel` Triton kernel (_rope_triton.py, imported at
the first launch), and the eager reference
`rope_ref`. The backward is the same kernel with the conjugate rotation (sin -> -sin).
"""

import functools

import torch

from nanollama.kernels._triton import launch_device, pow2_at_least
from nanollama.kernels.dispatch import use_triton
from nanollama.kernels.rope_scaling import SCALING_TYPES, check_rope_scaling, rope_frequencies

__all__ = ["SCALING_TYPES", "apply_rope", "check_rope_scaling", "rope_frequencies", "rope_ref"]

# ----------------------------------------------------------------------------- eager reference


def rope_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate x (B, S, H, D); math in float32 (float64 for float64 x), result in x's dtype."""
    S = x.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    if positions is None:
        c, s = cos[:S][None, :, None, :], sin[:S][None, :, None, :]  # (1, S, 1, D/2)
    else:
        c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # (B, S, 1, D/2)
    c, s, xf = c.to(compute), s.to(compute), x.to(compute)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, S, H, D/2) each: adjacent pairs
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)  # (B, S, H, D)
    else:
        x1, x2 = xf.chunk(2, dim=-1)  # (B, S, H, D/2) each: halves
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=512)
def _blocks(n_tokens: int, heads: int, half: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF). On a GPU a program holds about 2048 pairs (all heads of a
    token at Llama shapes); under the interpreter, whose cost is per operation, many more.
    Cached, keyed by ints and a bool: a hit costs ~0.3 us here, the arithmetic ~2.6 us (with
    triton.next_power_of_2 it was ~15 us)."""
    block_half = pow2_at_least(half)
    block_h = min(pow2_at_least(heads), max(1, 4096 // block_half))
    budget = 2048 if on_gpu else 1 << 16
    block_t = min(max(1, budget // (block_h * block_half)), pow2_at_least(n_tokens))
    return block_t, block_h, block_half


# ----------------------------------------------------------------------------- launcher

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the reference only


def _check_inputs(q, k, cos, sin, positions) -> None:
    """Shape, dtype and device checks shared by both paths (shape-only: safe while tracing)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, S, H, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, S, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, S and D")
    if D % 2:
        raise ValueError(f"head dim D must be even for RoPE; got {D}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q and k must share a dtype among float16/bfloat16/float32/float64; got {q.dtype}, {k.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D // 2:
        raise ValueError(f"cos and sin must be (L, D/2 = {D // 2}); got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if positions is None:
        if S > cos.shape[0]:
            raise ValueError(f"sequence length {S} exceeds the rope table's {cos.shape[0]} positions")
    elif positions.shape != (B, S) or positions.dtype not in (torch.int64, torch.int32):
        got = f"{positions.dtype} {tuple(positions.shape)}"
        raise ValueError(f"positions must be a (B, S) = ({B}, {S}) integer tensor; got {got}")
    device = q.device  # compared one by one: cheaper than building a set on every call
    if (
        k.device != device
        or cos.device != device
        or sin.device != device
        or (positions is not None and positions.device != device)
    ):
        devices = {t.device for t in (q, k, cos, sin, positions) if t is not None}
        raise ValueError(f"q, k, cos, sin and positions must be on one device; got {sorted(map(str, devices))}")


def _launch_rope(q, k, cos, sin, positions, interleaved: bool, conj: bool):
    """Rotate q and k in one launch; returns new contiguous (q_out, k_out) of q's dtype.

    Shape contract:
      q (B, S, Hq, D), k (B, S, Hk, D): any strides (views of a fused QKV output), one float dtype
      cos, sin (L, D/2) float32, any strides; row p is used for position p
      positions None (position of token s = s, needs S <= L) or (B, S) int32/int64, values in [0, L)
      interleaved: rotate pairs (2i, 2i+1) instead of (i, i + D/2); conj: rotate by -angle (backward)
    apply_rope checks shapes first (_check_inputs), once per call; the backward's gradients have the
    forward outputs' shapes by construction.
    """
    from nanollama.kernels import _rope_triton  # the kernel, defined at the first launch (see its docstring)

    if not q.is_cuda:
        # decorated while TRITON_INTERPRET was off
        if type(_rope_triton._rope_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "the RoPE Triton kernel was defined before TRITON_INTERPRET=1 was set: "
                "set it before the first Triton call (and before importing triton)"
            )
        # On the CPU the range check is cheap; on a GPU it would synchronise every call.
        _check_positions(positions, cos.shape[0])
    with launch_device(q):
        return _launch_rope_here(q, k, cos, sin, positions, interleaved, conj)


def _launch_rope_here(q, k, cos, sin, positions, interleaved: bool, conj: bool):
    B, S, Hq, D = q.shape
    Hk, half = k.shape[2], D // 2
    # Contiguous, like the fake impl. empty_like costs half of torch.empty(shape, dtype=, device=).
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    block_t, block_h, block_half = _blocks(B * S, max(Hq, Hk), half, q.is_cuda)
    pos = positions if positions is not None else q  # a dummy pointer, never read when HAS_POS is False
    pos_strides = positions.stride() if positions is not None else (0, 0)
    from nanollama.kernels._rope_triton import _rope_kernel

    _rope_kernel[(-(-(B * S) // block_t),)](
        q, k, q_out, k_out, cos, sin, pos,
        B, S, Hq, Hk, half, cos.shape[0],
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *cos.stride(), *sin.stride(), *pos_strides,
        HAS_POS=positions is not None, INTERLEAVED=interleaved, CONJ=conj,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4 if block_t * block_h * block_half <= 2048 else 8,
    )  # fmt: skip
    return q_out, k_out


# ----------------------------------------------------------------------------- torch op and autograd
#
# One route, eager and traced: _Rope.apply -> the nanollama::rope op, forward and backward (the
# backward is the op with conj flipped). The op's dispatch costs host time the former direct-launch
# eager route skipped; bench/host_cost.py measures it (figures in apply_rope's docstring).


@torch.library.custom_op(
    "nanollama::rope",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved, bool conj) -> (Tensor, Tensor)",  # noqa: E501
)
def _rope_op(q, k, cos, sin, positions, interleaved, conj):
    return _launch_rope(q, k, cos, sin, positions, interleaved, conj)


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, positions, interleaved, conj):
    return q.new_empty(q.shape), k.new_empty(k.shape)


class _Rope(torch.autograd.Function):
    """The rotation's autograd: out = R x, so dx = R^T dout, the op again with the angle negated.

    Not differentiable in cos and sin (tables, not parameters: apply_rope refuses tables that need grad).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, interleaved: bool, conj: bool):
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.conj = interleaved, conj
        return torch.ops.nanollama.rope(q, k, cos, sin, positions, interleaved, conj)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, positions = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: through _Rope again, so the backward is differentiable
            dq, dk = _Rope.apply(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conj)
        else:
            dq, dk = torch.ops.nanollama.rope(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conj)
        return dq, dk, None, None, None, None, None


def _check_positions(positions, length: int) -> None:
    """A ValueError for positions outside [0, length): one host sync on a GPU, so eager reference only."""
    if positions is None or not positions.numel() or torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(positions)
    if low < 0 or high >= length:
        raise ValueError(
            f"apply_rope: positions must lie in [0, {length}) (the rope table's length); got [{int(low)}, {int(high)}]"
        )


# ----------------------------------------------------------------------------- public


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) by the (L, D/2) tables cos and sin; returns (q_out, k_out).

    positions: None (token s sits at position s) or (B, S) integer positions into the tables.
    interleaved: rotate adjacent pairs (2i, 2i+1) instead of halves (i, i + D/2). Any strides in,
    contiguous out, same dtype (bf16/fp16/fp32), math in fp32. Differentiable in q and k.
    Triton (one launch for q and k) or the eager reference, as nanollama.kernels.dispatch decides.

    Positions outside [0, L): a ValueError on the reference path and on the Triton path with CPU
    tensors; on CUDA tensors the Triton path does not check (a check would synchronise the host
    every call) and rotates such tokens by nothing: their outputs are zeros. Under torch.compile no
    path checks. float64 inputs always take the reference.

    Host time per call with a no-op kernel (bench/host_cost.py: B1 S64 Hq32 Hk8 D128, 2 shared CPU
    cores, best of 5): forward no-grad 15 us (direct launch) -> ~80 us through _Rope and the op, forward +
    torch.autograd.grad 125 -> ~235 us (about 80 us of that is autograd's own floor). The GPU
    floor at B8 S2048 on an H200 is ~78 us forward, ~156 us forward + backward.
    """
    _check_inputs(q, k, cos, sin, positions)  # the only check on the eager path
    tensors = (q, k, cos, sin) if positions is None else (q, k, cos, sin, positions)
    if use_triton(*tensors):
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("apply_rope: the Triton path does not differentiate cos and sin; detach them")
        return _Rope.apply(q, k, cos.float(), sin.float(), positions, interleaved, False)
    _check_positions(positions, cos.shape[0])
    return rope_ref(q, cos, sin, positions, interleaved), rope_ref(k, cos, sin, positions, interleaved)
