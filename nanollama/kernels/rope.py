"""Rotary position embeddings: frequency tables (with long-context scaling) and a fused rotation.

Layers, top to bottom: `apply_rope` (public; checks the inputs once and dispatches to the Triton
path or the eager reference), then two routes to the same launch: the `nanollama::rope` torch op
(forward and backward, what torch.compile traces) and, eagerly, `_RopeFunction` (or the launcher
directly when no gradient is wanted), which skips the op's dispatch cost. Below them the launcher
`_launch_rope` (one launch for q and k), the `_rope_kernel` Triton kernel, and the eager reference
`rope_ref`. The backward is the same kernel with the conjugate rotation (sin -> -sin).
"""

import functools
import math

import torch

from nanollama.kernels.dispatch import use_triton
from nanollama.utils.checks import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager reference still works; forcing Triton then fails in dispatch
    triton = None

__all__ = ["SCALING_TYPES", "apply_rope", "check_rope_scaling", "rope_frequencies", "rope_ref"]

# ----------------------------------------------------------------------------- scaling

_REQUIRED = object()
# Keys per scaling type and their defaults (_REQUIRED: must be given). original_max_seq_len is the
# context length the model was trained at; linear and ntk accept it for uniformity but do not use it.
SCALING_TYPES: dict[str, dict[str, object]] = {
    "none": {},
    "linear": {"factor": _REQUIRED, "original_max_seq_len": None},
    "ntk": {"factor": _REQUIRED, "original_max_seq_len": None},
    "yarn": {
        "factor": _REQUIRED,
        "original_max_seq_len": _REQUIRED,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": None,  # None: 0.1 * ln(factor) + 1, YaRN's temperature
    },
    "llama3": {"factor": _REQUIRED, "original_max_seq_len": _REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def _number(value, field: str, low: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ConfigError(f"rope_scaling.{field}", f"must be a number {'>' if strict else '>='} {low}; got {value!r}")
    return float(value)


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """Validate a rope scaling dict and fill in defaults; None (or type 'none') means no scaling.

    Types and keys (see SCALING_TYPES for defaults):
      linear: factor                    positions divided by factor (position interpolation)
      ntk:    factor                    base theta * factor ** (D / (D - 2)) (NTK-aware)
      yarn:   factor, original_max_seq_len, beta_fast, beta_slow, attention_factor
      llama3: factor, original_max_seq_len, low_freq_factor, high_freq_factor
    Errors name the field as rope_scaling.<key>.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError("rope_scaling", f"must be a mapping with a 'type' key or null; got {scaling!r}")
    kind = scaling.get("type")
    if kind not in SCALING_TYPES:
        raise ConfigError("rope_scaling.type", f"must be one of {', '.join(SCALING_TYPES)}; got {kind!r}")
    spec = SCALING_TYPES[kind]
    out: dict = {"type": kind}
    for key in scaling:
        if key != "type" and key not in spec:
            allowed = ", ".join(spec) or "no other keys"
            raise ConfigError(f"rope_scaling.{key}", f"unknown key for type {kind!r} (allowed: {allowed})")
    for key, default in spec.items():
        if scaling.get(key) is None and default is _REQUIRED:
            raise ConfigError(f"rope_scaling.{key}", f"required for type {kind!r}")
        out[key] = scaling[key] if scaling.get(key) is not None else default
    if kind == "none":
        return None
    out["factor"] = _number(out["factor"], "factor", 1.0, strict=False)
    ctx = out["original_max_seq_len"]
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0):
        raise ConfigError("rope_scaling.original_max_seq_len", f"must be a positive integer; got {ctx!r}")
    if kind == "yarn":
        out["beta_slow"] = _number(out["beta_slow"], "beta_slow", 0.0, strict=True)
        out["beta_fast"] = _number(out["beta_fast"], "beta_fast", out["beta_slow"], strict=True)
        if out["attention_factor"] is not None:
            out["attention_factor"] = _number(out["attention_factor"], "attention_factor", 0.0, strict=True)
    if kind == "llama3":
        out["low_freq_factor"] = _number(out["low_freq_factor"], "low_freq_factor", 0.0, strict=True)
        out["high_freq_factor"] = _number(out["high_freq_factor"], "high_freq_factor", out["low_freq_factor"], True)
    return out


def _scaled_inv_freq(head_dim: int, theta: float, scaling: dict | None, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in float64 and the factor that multiplies cos and sin."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim  # 2i / D
    inv_freq = theta**-exponent
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "ntk":  # change of base so the lowest frequency is interpolated by `factor`
        return (theta * factor ** (head_dim / (head_dim - 2))) ** -exponent, 1.0
    ctx = scaling["original_max_seq_len"]
    if kind == "yarn":
        # Dimension i turns ctx * inv_freq[i] / (2 pi) times over the trained context: more than
        # beta_fast turns -> keep (extrapolate), fewer than beta_slow -> interpolate, ramp between.
        def dim_for(turns: float) -> float:
            return head_dim * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_for(scaling["beta_fast"])), 0)
        high = min(math.ceil(dim_for(scaling["beta_slow"])), head_dim - 1)
        high = high if high > low else low + 0.001  # avoid a zero-width ramp
        idx = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
        ramp = ((idx - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep, 1: interpolate
        inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
        attention = scaling["attention_factor"]
        return inv_freq, attention if attention is not None else 0.1 * math.log(factor) + 1.0
    # llama3: wavelengths shorter than ctx / high_freq_factor kept, longer than ctx / low_freq_factor
    # divided by factor, smooth in between.
    low_f, high_f = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - low_f) / (high_f - low_f)).clamp(0.0, 1.0)  # 1: keep, 0: divide
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0


def rope_frequencies(
    seq_len: int, head_dim: int, theta: float = 10000.0, scaling: dict | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim // 2) float32: cos[p, i] = m * cos(p * f_i), f_i = theta^(-2i/D).

    `scaling` (see check_rope_scaling) changes f_i, and yarn sets the temperature m (1 otherwise).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer for RoPE; got {head_dim!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer; got {seq_len!r}")
    if not theta > 1.0:
        raise ValueError(f"theta must be > 1; got {theta!r}")
    inv_freq, mscale = _scaled_inv_freq(head_dim, float(theta), check_rope_scaling(scaling), device)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (S, D/2)
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


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


# ----------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _rotate_heads(
        X, OUT, H, HALF, stride_x_b, stride_x_s, stride_x_h, stride_x_d,
        stride_out_b, stride_out_s, stride_out_h, stride_out_d, b, s, mask_t, cos, sin,
        INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        # Rotate all H heads of BLOCK_T tokens (b, s) by cos, sin (BLOCK_T, 1, BLOCK_HALF).
        x_tok = (X + b * stride_x_b + s * stride_x_s)[:, None, None]  # (BLOCK_T, 1, 1) pointers
        out_tok = (OUT + b * stride_out_b + s * stride_out_s)[:, None, None]
        for h0 in range(0, H, BLOCK_H):
            h = (h0 + tl.arange(0, BLOCK_H))[None, :, None]  # (1, BLOCK_H, 1)
            x_row, out_row = x_tok + h * stride_x_h, out_tok + h * stride_out_h
            if INTERLEAVED:
                # Pairs (2i, 2i + 1): load whole rows (wide contiguous loads) and split the pairs
                # in registers, rather than two stride-2 loads.
                d = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]  # (1, 1, D)
                mask = mask_t[:, None, None] & (h < H) & (d < 2 * HALF)  # (BLOCK_T, BLOCK_H, D)
                x = tl.load(x_row + d * stride_x_d, mask=mask, other=0.0).to(tl.float32)
                x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))  # (BLOCK_T, BLOCK_H, D/2)
                out = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)  # (BLOCK_T, BLOCK_H, D/2, 2)
                out = tl.reshape(out, (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF))
                tl.store(out_row + d * stride_out_d, out.to(OUT.dtype.element_ty), mask=mask)
            else:
                # Pairs (i, i + D/2): two contiguous half-row loads.
                i = tl.arange(0, BLOCK_HALF)[None, None, :]  # (1, 1, D/2)
                mask = mask_t[:, None, None] & (h < H) & (i < HALF)  # (BLOCK_T, BLOCK_H, D/2)
                x1 = tl.load(x_row + i * stride_x_d, mask=mask, other=0.0).to(tl.float32)
                x2 = tl.load(x_row + (i + HALF) * stride_x_d, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_row + i * stride_out_d, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
                tl.store(out_row + (i + HALF) * stride_out_d, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q, K, Q_OUT, K_OUT, COS, SIN, POS,
        B, S, HQ, HK, HALF,
        stride_q_b, stride_q_s, stride_q_h, stride_q_d,
        stride_k_b, stride_k_s, stride_k_h, stride_k_d,
        stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d,
        stride_ko_b, stride_ko_s, stride_ko_h, stride_ko_d,
        stride_cos_p, stride_cos_d, stride_sin_p, stride_sin_d,
        stride_pos_b, stride_pos_s,
        HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJ: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK_T consecutive tokens of the flattened (B, S): each token's cos/sin
        # row is loaded once for all of its Hq + Hk heads.
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: large offsets
        mask_t = t < B * S
        b = t // S
        s = t % S
        if HAS_POS:
            p = tl.load(POS + b * stride_pos_b + s * stride_pos_s, mask=mask_t, other=0).to(tl.int64)
        else:
            p = s
        i = tl.arange(0, BLOCK_HALF)
        mask_d = i < HALF
        mask_cs = mask_t[:, None] & mask_d[None, :]  # (BLOCK_T, BLOCK_HALF)
        cos = tl.load(COS + p[:, None] * stride_cos_p + i[None, :] * stride_cos_d, mask=mask_cs, other=0.0)
        sin = tl.load(SIN + p[:, None] * stride_sin_p + i[None, :] * stride_sin_d, mask=mask_cs, other=0.0)
        if CONJ:  # the inverse (transposed) rotation: the backward pass
            sin = -sin
        cos, sin = cos[:, None, :], sin[:, None, :]  # (BLOCK_T, 1, BLOCK_HALF), broadcast over heads
        _rotate_heads(
            Q, Q_OUT, HQ, HALF, stride_q_b, stride_q_s, stride_q_h, stride_q_d,
            stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d, b, s, mask_t, cos, sin,
            INTERLEAVED, BLOCK_T, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
        _rotate_heads(
            K, K_OUT, HK, HALF, stride_k_b, stride_k_s, stride_k_h, stride_k_d,
            stride_ko_b, stride_ko_s, stride_ko_h, stride_ko_d, b, s, mask_t, cos, sin,
            INTERLEAVED, BLOCK_T, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip


def _pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (plain int math: triton.next_power_of_2 is a ConstexprFunction
    in Triton 3.9 and costs ~4 us per host call here)."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=512)
def _blocks(n_tokens: int, heads: int, half: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF). On a GPU a program holds about 2048 pairs (all heads of a
    token at Llama shapes); under the interpreter, whose cost is per operation, many more.
    Cached, keyed by ints and a bool: a hit costs ~0.3 us here, the arithmetic ~2.6 us (with
    triton.next_power_of_2 it was ~15 us)."""
    block_half = _pow2_at_least(half)
    block_h = min(_pow2_at_least(heads), max(1, 4096 // block_half))
    budget = 2048 if on_gpu else 1 << 16
    block_t = min(max(1, budget // (block_h * block_half)), _pow2_at_least(n_tokens))
    return block_t, block_h, block_half


# ----------------------------------------------------------------------------- launcher

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        raise ValueError(f"q and k must share a dtype among float32/float16/bfloat16; got {q.dtype}, {k.dtype}")
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


def _check_tables(cos, sin) -> None:
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 for the Triton path; got {cos.dtype}, {sin.dtype}")


def _launch_rope(q, k, cos, sin, positions, interleaved: bool, conj: bool):
    """Rotate q and k in one launch; returns new contiguous (q_out, k_out) of q's dtype.

    Shape contract:
      q (B, S, Hq, D), k (B, S, Hk, D): any strides (views of a fused QKV output), one float dtype
      cos, sin (L, D/2) float32, any strides; row p is used for position p
      positions None (position of token s = s, needs S <= L) or (B, S) int32/int64, values in [0, L)
      interleaved: rotate pairs (2i, 2i+1) instead of (i, i + D/2); conj: rotate by -angle (backward)
    Callers check shapes first (_check_inputs, _check_tables): apply_rope once per call, the torch
    op on each of its calls; the backward's gradients have the forward outputs' shapes by construction.
    """
    if not q.is_cuda:
        if type(_rope_kernel).__name__ != "InterpretedFunction":  # decorated while TRITON_INTERPRET was off
            raise RuntimeError(
                "the RoPE Triton kernel was defined before TRITON_INTERPRET=1 was set: "
                "set it before importing nanollama.kernels"
            )
        # On the CPU the range check is cheap; on a GPU it would synchronise every call.
        if positions is not None and positions.numel() and not 0 <= positions.min() <= positions.max() < cos.shape[0]:
            raise ValueError(f"positions must lie in [0, {cos.shape[0]}) (the rope table's length)")
    elif q.get_device() != torch.cuda.current_device():
        # Triton launches on the current CUDA device. Entering torch.cuda.device costs a few us per
        # call, so only when q lives elsewhere.
        with torch.cuda.device(q.device):
            return _launch_rope_here(q, k, cos, sin, positions, interleaved, conj)
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
    _rope_kernel[(-(-(B * S) // block_t),)](
        q, k, q_out, k_out, cos, sin, pos,
        B, S, Hq, Hk, half,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *cos.stride(), *sin.stride(), *pos_strides,
        HAS_POS=positions is not None, INTERLEAVED=interleaved, CONJ=conj,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4 if block_t * block_h * block_half <= 2048 else 8,
    )  # fmt: skip
    return q_out, k_out


# ----------------------------------------------------------------------------- torch op (traced path)
#
# Two routes to the same launch. Under torch.compile (and export) apply_rope calls the torch op
# nanollama::rope, which tracing needs (schema, fake impl, autograd registration). Eagerly it calls
# _RopeFunction, or the launcher itself when no gradient is wanted: the op's dispatch costs ~21 us
# of host time per call (paid again in the backward), about a quarter of the forward's GPU time at
# B8 S2048 Hq32 Hk8 D128 on an H200 (~78 us). See apply_rope for the measured figures.


@torch.library.custom_op(
    "nanollama::rope",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved, bool conj) -> (Tensor, Tensor)",  # noqa: E501
)
def _rope_op(q, k, cos, sin, positions, interleaved, conj):
    _check_inputs(q, k, cos, sin, positions)
    _check_tables(cos, sin)
    return _launch_rope(q, k, cos, sin, positions, interleaved, conj)


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, positions, interleaved, conj):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, positions, interleaved, conj = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved, ctx.conj = interleaved, conj


def _rope_backward(ctx, grad_q, grad_k):
    # out = R x  =>  dx = R^T dout: the same rotation with the angle negated. Not differentiable
    # in cos and sin (tables, not parameters: apply_rope refuses tables that require grad).
    cos, sin, positions = ctx.saved_tensors
    dq, dk = torch.ops.nanollama.rope(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conj)
    return dq, dk, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------- eager path


class _RopeFunction(torch.autograd.Function):
    """The eager twin of the op's autograd registration: same saved tensors, same conjugate backward."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, interleaved: bool, conj: bool):
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.conj = interleaved, conj
        return _launch_rope(q, k, cos, sin, positions, interleaved, conj)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, positions = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward must itself be differentiable
            dq, dk = _RopeFunction.apply(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conj)
        else:
            dq, dk = _launch_rope(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conj)
        return dq, dk, None, None, None, None, None


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

    Eagerly the Triton path skips the torch op (see "two routes" above). Host time per call with a
    no-op kernel, B1 S64 Hq32 Hk8 D128, 2 shared CPU cores, best of 5 alternating runs: forward
    no-grad 81 -> 14 us, forward + torch.autograd.grad 321 -> 135 us (of which ~80 us is autograd's
    own floor: a no-op autograd.Function costs that much here). The GPU floor at B8 S2048 on an H200
    is ~78 us forward, ~156 us forward + backward; real Triton launches add ~5-20 us each.
    """
    _check_inputs(q, k, cos, sin, positions)  # the only check on the eager path
    tensors = (q, k, cos, sin) if positions is None else (q, k, cos, sin, positions)
    if use_triton(*tensors):
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("apply_rope: the Triton path does not differentiate cos and sin; detach them")
        cos, sin = cos.float(), sin.float()
        if torch.compiler.is_compiling():  # traced: the op, which the graph can hold
            return torch.ops.nanollama.rope(q, k, cos, sin, positions, interleaved, False)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return _RopeFunction.apply(q, k, cos, sin, positions, interleaved, False)
        return _launch_rope(q, k, cos, sin, positions, interleaved, False)
    return rope_ref(q, cos, sin, positions, interleaved), rope_ref(k, cos, sin, positions, interleaved)
