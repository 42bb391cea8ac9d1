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
    A, B, H0, H, H_LAST,
    T, C,
    stride_a_b, stride_a_t, stride_a_c,
    stride_b_b, stride_b_t, stride_b_c,
    stride_h0_b, stride_h0_c,
    stride_h_b, stride_h_t, stride_h_c,
    stride_hl_b, stride_hl_c,
    HAS_H0: tl.constexpr, LOG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask_c = c < C
    rows = tl.arange(0, BLOCK_T)[:, None]  # (BLOCK_T, 1)
    if HAS_H0:
        carry = tl.load(H0 + pid_b * stride_h0_b + c * stride_h0_c, mask=mask_c, other=0.0).to(tl.float32)
    elif LOG:
        carry = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), tl.float32)
    a_row = A + pid_b * stride_a_b + c[None, :] * stride_a_c  # (1, BLOCK_C) pointers
    b_row = B + pid_b * stride_b_b + c[None, :] * stride_b_c
    h_row = H + pid_b * stride_h_b + c[None, :] * stride_h_c
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows  # (BLOCK_T, 1)
        mask = (t < T) & mask_c[None, :]  # (BLOCK_T, BLOCK_C)
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
        tl.store(h_row + t * stride_h_t, h.to(H.dtype.element_ty), mask=mask)
        carry = _row(h, rows, BLOCK_T - 1)  # padded rows repeat the last real one
    tl.store(H_LAST + pid_b * stride_hl_b + c * stride_hl_c, carry.to(H_LAST.dtype.element_ty), mask=mask_c)


@triton.jit
def _scan_bwd_kernel(
    A, H, H0, G, G_LAST, DA, DB, DH0,
    T, C,
    stride_a_b, stride_a_t, stride_a_c,
    stride_h_b, stride_h_t, stride_h_c,
    stride_h0_b, stride_h0_c,
    stride_g_b, stride_g_t, stride_g_c,
    stride_gl_b, stride_gl_c,
    stride_da_b, stride_da_t, stride_da_c,
    stride_db_b, stride_db_t, stride_db_c,
    stride_dh0_b, stride_dh0_c,
    HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # dh_t = a_{t+1} dh_{t+1} + g_t from the end, starting from dh_T := g_last with a_T := 1;
    # grad_b = dh, grad_a_t = dh_t h_{t-1} (h_{-1} = h0), grad_h0 = a_0 dh_0.
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    rows = tl.arange(0, BLOCK_T)[:, None]
    carry = tl.load(G_LAST + pid_b * stride_gl_b + c * stride_gl_c, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * stride_h0_b + c * stride_h0_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros((BLOCK_C,), tl.float32)
    a_row = A + pid_b * stride_a_b + c[None, :] * stride_a_c
    h_row = H + pid_b * stride_h_b + c[None, :] * stride_h_c
    g_row = G + pid_b * stride_g_b + c[None, :] * stride_g_c
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_blocks - 1 - i) * BLOCK_T + rows  # (BLOCK_T, 1), chunks from the last
        mask = (t < T) & mask_c[None, :]
        a_next = tl.load(a_row + (t + 1) * stride_a_t, mask=(t + 1 < T) & mask_c[None, :], other=1.0).to(tl.float32)
        g = tl.load(g_row + t * stride_g_t, mask=mask, other=0.0).to(tl.float32)
        acc_a, acc_g = tl.associative_scan((a_next, g), 0, _combine, reverse=True)
        dh = acc_a * carry[None, :] + acc_g  # (BLOCK_T, BLOCK_C)
        h_prev = tl.load(h_row + (t - 1) * stride_h_t, mask=(t >= 1) & mask, other=0.0).to(tl.float32)
        h_prev = tl.where(t == 0, h0[None, :], h_prev)
        tl.store(DA + pid_b * stride_da_b + t * stride_da_t + c[None, :] * stride_da_c,
                 (dh * h_prev).to(DA.dtype.element_ty), mask=mask)  # fmt: skip
        tl.store(DB + pid_b * stride_db_b + t * stride_db_t + c[None, :] * stride_db_c,
                 dh.to(DB.dtype.element_ty), mask=mask)  # fmt: skip
        carry = _row(dh, rows, 0)
    a0 = tl.load(A + pid_b * stride_a_b + c * stride_a_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(DH0 + pid_b * stride_dh0_b + c * stride_dh0_c, (a0 * carry).to(DH0.dtype.element_ty), mask=mask_c)
