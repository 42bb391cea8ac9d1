"""The two decode Triton kernels (private to decode.py, which imports them at its first launch:
importing triton costs ~0.25 s, which `import nanollama.kernels` must not pay). TRITON_INTERPRET=1
must be set before this module is imported, since triton.jit picks the interpreter when it decorates."""

import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    SEQLENS,
    OPART,
    LSE,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_v_d,
    stride_seqlens_b,
    stride_opart_b,
    stride_opart_h,
    stride_opart_split,
    stride_opart_d,
    stride_lse_b,
    stride_lse_h,
    stride_lse_split,
    qk_scale_log2,  # scale * log2(e): the softmax runs in base 2
    S_MAX,
    SPLIT_SIZE,
    HK: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)  # int64: b * stride_k_b overflows int32 on large caches
    hk = (pid_bh % HK).to(tl.int64)

    seqlen = tl.load(SEQLENS + b * stride_seqlens_b).to(tl.int32)
    seqlen = tl.minimum(seqlen, S_MAX)  # never read past the allocation, whatever the caller passes
    start = pid_split * SPLIT_SIZE
    # Splits at or beyond this sequence's length do nothing: the ragged saving.
    if start < seqlen:
        end = tl.minimum(start + SPLIT_SIZE, seqlen)
        offs_g = tl.arange(0, BLOCK_G)  # query heads of the group, padded to a tl.dot-able size
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = hk * GROUP + offs_g  # (BLOCK_G,) query head indices

        q_ptrs = Q + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d
        q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

        k_base = K + b * stride_k_b + hk * stride_k_h
        v_base = V + b * stride_v_b + hk * stride_v_h
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            # Masked lanes are never loaded: slots at/after seqlen may hold NaN.
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * stride_k_s + offs_d[None, :] * stride_k_d, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_G, BLOCK_N)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # Every block holds at least one valid key (n0 < end), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_v_s + offs_d[None, :] * stride_v_d, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        o_ptrs = (
            OPART
            + b * stride_opart_b
            + heads[:, None] * stride_opart_h
            + pid_split * stride_opart_split
            + offs_d[None, :] * stride_opart_d
        )
        tl.store(o_ptrs, out, mask=mask_g[:, None] & mask_d[None, :])
        lse_ptrs = LSE + b * stride_lse_b + heads * stride_lse_h + pid_split * stride_lse_split
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    OPART,
    LSE,
    SEQLENS,
    OUT,
    stride_opart_b,
    stride_opart_h,
    stride_opart_split,
    stride_opart_d,
    stride_lse_b,
    stride_lse_h,
    stride_lse_split,
    stride_seqlens_b,
    stride_out_b,
    stride_out_h,
    stride_out_d,
    S_MAX,
    SPLIT_SIZE,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    seqlen = tl.minimum(tl.load(SEQLENS + b * stride_seqlens_b).to(tl.int32), S_MAX)
    n_splits = tl.cdiv(seqlen, SPLIT_SIZE)  # only the splits the split kernel wrote
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse_base = LSE + b * stride_lse_b + h * stride_lse_h
    o_base = OPART + b * stride_opart_b + h * stride_opart_h
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Online merge over chunks of splits, so long caches with many splits need no big register tile.
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_splits
        lse = tl.load(lse_base + offs_s * stride_lse_split, mask=mask_s, other=float("-inf"))  # (BLOCK_S,)
        m_new = tl.maximum(m, tl.max(lse, axis=0))  # finite: each chunk has a written split
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # (BLOCK_S,), zero on masked splits
        o = tl.load(
            o_base + offs_s[:, None] * stride_opart_split + offs_d[None, :] * stride_opart_d,
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        denom = denom * alpha + tl.sum(w, axis=0)
        m = m_new
    # An empty sequence (seqlen <= 0) attends to nothing: its output is zeros, as in the reference.
    # Decided by the length, not by denom > 0, so a NaN (from q or a visible slot) stays NaN.
    denom = tl.where(seqlen > 0, denom, 1.0)
    out = acc / denom
    tl.store(OUT + b * stride_out_b + h * stride_out_h + offs_d * stride_out_d, out, mask=mask_d)
