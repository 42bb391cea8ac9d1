"""The linear-scan Triton kernels (private to scan.py, which imports this module at its first launch:
importing triton costs ~0.25 s, which `import nanollama.kernels` must not pay). TRITON_INTERPRET=1 must be
set before this module is imported, since triton.jit picks the interpreter when it decorates a function.

One program owns a (batch row, BLOCK_C channels) strip and walks the sequence in BLOCK_T-long chunks:
each chunk is loaded whole (BLOCK_T x BLOCK_C, coalesced along the contiguous channel axis), scanned in
registers with tl.associative_scan, and joined to the state carried from the previous chunk. Padded rows
(past T) load the scan's identity (a = 1, b = 0), so the carry is simply the chunk's last (first, in
reverse) row.
"""

import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _logaddexp(x, y):
    hi, lo = tl.maximum(x, y), tl.minimum(x, y)
    empty = hi == float("-inf")  # both -inf (h = 0): stand-in zeros avoid -inf - -inf and log(0)
    hi_s, lo_s = tl.where(empty, 0.0, hi), tl.where(empty, 0.0, lo)
    return tl.where(empty, float("-inf"), hi_s + tl.log(1.0 + tl.exp(lo_s - hi_s)))


@triton.jit
def _combine_log(la1, lb1, la2, lb2):
    # the same composition with a = exp(la), b = exp(lb)
    return la1 + la2, _logaddexp(la2 + lb1, lb2)


@triton.jit
def _row(x, rows, r: tl.constexpr):
    # row r of a (BLOCK_T, BLOCK_C) block as a (BLOCK_C,) vector
    return tl.sum(tl.where(rows == r, x, 0.0), axis=0)


@triton.jit
def _scan_fwd_kernel(
    A, B, H0, H, H_LAST, PROD,
    T, C, SEG,
    stride_a_b, stride_a_t, stride_a_c,
    stride_b_b, stride_b_t, stride_b_c,
    stride_h0_b, stride_h0_s, stride_h0_c,
    stride_h_b, stride_h_t, stride_h_c,
    stride_hl_b, stride_hl_s, stride_hl_c,
    stride_p_b, stride_p_s, stride_p_c,
    HAS_H0: tl.constexpr, LOG: tl.constexpr, WRITE_H: tl.constexpr, WRITE_PROD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, segment s) scans t in [s SEG, min((s + 1) SEG, T)) from H0[b, s]; it
    # writes h (WRITE_H), the segment's last h into H_LAST[b, s] and (WRITE_PROD) its product of a
    # (sum of log a) into PROD[b, s]: the segment as one step of the carry scan across segments.
    pid_b, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask_c = c < C
    rows = tl.arange(0, BLOCK_T)[:, None]  # (BLOCK_T, 1)
    seg_start = pid_s * SEG
    seg_end = tl.minimum(seg_start + SEG, T)
    if HAS_H0:
        h0_ptr = H0 + pid_b * stride_h0_b + pid_s * stride_h0_s + c * stride_h0_c
        carry = tl.load(h0_ptr, mask=mask_c, other=0.0).to(tl.float32)
    elif LOG:
        carry = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), tl.float32)
    prod = tl.zeros((BLOCK_C,), tl.float32) if LOG else tl.full((BLOCK_C,), 1.0, tl.float32)
    a_row = A + pid_b * stride_a_b + c[None, :] * stride_a_c  # (1, BLOCK_C) pointers
    b_row = B + pid_b * stride_b_b + c[None, :] * stride_b_c
    h_row = H + pid_b * stride_h_b + c[None, :] * stride_h_c
    for t0 in range(seg_start, seg_end, BLOCK_T):
        t = t0 + rows  # (BLOCK_T, 1)
        mask = (t < seg_end) & mask_c[None, :]  # (BLOCK_T, BLOCK_C)
        if LOG:  # identity (log a, log b) = (0, -inf)
            a = tl.load(a_row + t * stride_a_t, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_row + t * stride_b_t, mask=mask, other=float("-inf")).to(tl.float32)
            acc_a, acc_b = tl.associative_scan((a, b), 0, _combine_log)
            h = _logaddexp(acc_a + carry[None, :], acc_b)
        else:  # identity (a, b) = (1, 0)
            a = tl.load(a_row + t * stride_a_t, mask=mask, other=1.0).to(tl.float32)
            b = tl.load(b_row + t * stride_b_t, mask=mask, other=0.0).to(tl.float32)
            acc_a, acc_b = tl.associative_scan((a, b), 0, _combine)
            h = acc_a * carry[None, :] + acc_b  # (BLOCK_T, BLOCK_C)
        if WRITE_H:
            tl.store(h_row + t * stride_h_t, h.to(H.dtype.element_ty), mask=mask)
        if WRITE_PROD:
            total = _row(acc_a, rows, BLOCK_T - 1)
            prod = prod + total if LOG else prod * total
        carry = _row(h, rows, BLOCK_T - 1)  # padded rows repeat the last real one
    hl_ptr = H_LAST + pid_b * stride_hl_b + pid_s * stride_hl_s + c * stride_hl_c
    tl.store(hl_ptr, carry.to(H_LAST.dtype.element_ty), mask=mask_c)
    if WRITE_PROD:
        tl.store(PROD + pid_b * stride_p_b + pid_s * stride_p_s + c * stride_p_c, prod, mask=mask_c)


@triton.jit
def _scan_bwd_kernel(
    A, H, H0, G, G_LAST, DA, DB, DH0, PROD,
    T, C, SEG,
    stride_a_b, stride_a_t, stride_a_c,
    stride_h_b, stride_h_t, stride_h_c,
    stride_h0_b, stride_h0_c,
    stride_g_b, stride_g_t, stride_g_c,
    stride_gl_b, stride_gl_s, stride_gl_c,
    stride_da_b, stride_da_t, stride_da_c,
    stride_db_b, stride_db_t, stride_db_c,
    stride_dh0_b, stride_dh0_s, stride_dh0_c,
    stride_p_b, stride_p_s, stride_p_c,
    HAS_H0: tl.constexpr, WRITE_GRADS: tl.constexpr, WRITE_PROD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # dh_t = a_{t+1} dh_{t+1} + g_t from the end, starting from dh_T := g_last with a_T := 1;
    # grad_b = dh, grad_a_t = dh_t h_{t-1} (h_{-1} = h0), grad_h0 = a_0 dh_0. Program (b, channel block,
    # segment s) runs its segment from its end, from dh at the next segment's start G_LAST[b, s]; it
    # writes the grads (WRITE_GRADS), dh at its first row into DH0[b, s] (times a_0 for s = 0: grad_h0),
    # and (WRITE_PROD) the product of a_{t+1} over the segment into PROD[b, s].
    pid_b, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    rows = tl.arange(0, BLOCK_T)[:, None]
    seg_start = pid_s * SEG
    seg_end = tl.minimum(seg_start + SEG, T)
    gl_ptr = G_LAST + pid_b * stride_gl_b + pid_s * stride_gl_s + c * stride_gl_c
    carry = tl.load(gl_ptr, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * stride_h0_b + c * stride_h0_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros((BLOCK_C,), tl.float32)
    prod = tl.full((BLOCK_C,), 1.0, tl.float32)
    a_row = A + pid_b * stride_a_b + c[None, :] * stride_a_c
    h_row = H + pid_b * stride_h_b + c[None, :] * stride_h_c
    g_row = G + pid_b * stride_g_b + c[None, :] * stride_g_c
    n_blocks = tl.cdiv(seg_end - seg_start, BLOCK_T)
    for i in range(0, n_blocks):
        t = seg_start + (n_blocks - 1 - i) * BLOCK_T + rows  # (BLOCK_T, 1), chunks from the last
        mask = (t < seg_end) & mask_c[None, :]
        next_mask = (t + 1 < T) & mask  # a_T := 1 and padded rows: the identity
        a_next = tl.load(a_row + (t + 1) * stride_a_t, mask=next_mask, other=1.0).to(tl.float32)
        g = tl.load(g_row + t * stride_g_t, mask=mask, other=0.0).to(tl.float32)
        acc_a, acc_g = tl.associative_scan((a_next, g), 0, _combine, reverse=True)
        dh = acc_a * carry[None, :] + acc_g  # (BLOCK_T, BLOCK_C)
        if WRITE_GRADS:
            h_prev = tl.load(h_row + (t - 1) * stride_h_t, mask=(t >= 1) & mask, other=0.0).to(tl.float32)
            h_prev = tl.where(t == 0, h0[None, :], h_prev)
            tl.store(DA + pid_b * stride_da_b + t * stride_da_t + c[None, :] * stride_da_c,
                     (dh * h_prev).to(DA.dtype.element_ty), mask=mask)  # fmt: skip
            tl.store(DB + pid_b * stride_db_b + t * stride_db_t + c[None, :] * stride_db_c,
                     dh.to(DB.dtype.element_ty), mask=mask)  # fmt: skip
        if WRITE_PROD:
            prod = prod * _row(acc_a, rows, 0)
        carry = _row(dh, rows, 0)
    if pid_s == 0:  # grad_h0 = a_0 dh_0
        a0 = tl.load(A + pid_b * stride_a_b + c * stride_a_c, mask=mask_c, other=0.0).to(tl.float32)
        carry_out = a0 * carry
    else:
        carry_out = carry
    dh0_ptr = DH0 + pid_b * stride_dh0_b + pid_s * stride_dh0_s + c * stride_dh0_c
    tl.store(dh0_ptr, carry_out.to(DH0.dtype.element_ty), mask=mask_c)
    if WRITE_PROD:
        tl.store(PROD + pid_b * stride_p_b + pid_s * stride_p_s + c * stride_p_c, prod, mask=mask_c)
