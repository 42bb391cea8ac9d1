"""The RoPE Triton kernel (private to rope.py, which imports it at its first launch: importing triton
costs ~0.25 s, which `import nanollama.kernels` must not pay). TRITON_INTERPRET=1 must be set before
this module is imported, since triton.jit picks the interpreter when it decorates a function."""

import triton
import triton.language as tl


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
    B, S, HQ, HK, HALF, L,
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
    # positions outside [0, L) read no table row: cos = sin = 0, so those tokens come out as zeros
    # (never an out-of-bounds read; checking on the host would synchronise every call)
    mask_p = mask_t & (p >= 0) & (p < L)
    mask_cs = mask_p[:, None] & mask_d[None, :]  # (BLOCK_T, BLOCK_HALF)
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
