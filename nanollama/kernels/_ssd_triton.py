"""The SSD (Mamba-2) Triton kernels: private to _ssd_launch.py, which imports this module at its first launch
(importing triton costs ~0.25 s, which `import nanollama.kernels` must not pay). TRITON_INTERPRET=1 must be
set before this module is imported, since triton.jit picks the interpreter when it decorates a function.

Three forward kernels, the usual chunked SSD (names as in ssd.py: L chunk length, K chunks, P head dim, N state):
  _ssd_state_kernel   per (chunk, batch x head, P x N tile): the chunk's cumulative log decay (a cumsum of
                      dt A within the chunk) and its final state from a zero start, (w x)^T B with
                      w_l = dt_l exp(A_cum[end] - A_cum[l]): one dot over the chunk's L rows.
  _ssd_carry_kernel   per (batch x head, P*N block): the short sequential scan over the K chunks,
                      S_k = exp(A_cum_k[end]) S_{k-1} + state_k, writing in place the state entering each chunk.
  _ssd_output_kernel  per (chunk, batch x head, P tile): y = ((C B^T) o decay) (dt x) + exp(A_cum) C S_in,
                      the decay exp(A_cum[l] - A_cum[s]) for s <= l.
The backward reuses the state kernel (FROM_START: the output's gradient into each chunk's entering state)
and the carry kernel (REVERSE: that gradient carried from the last chunk), then _ssd_bwd_kernel, one
program per (chunk, batch x head) holding all of P and walking N twice, for every input's gradient.
Resets (optional, (B, T)): a reset at t drops the state before t, so every decay across it is zero
(_chunk_resets: a per-chunk count of resets decides which are). Rows past T (the last chunk's padding) and
past L (when L is not a power of two) load dt = x = B = C = 0: decay 1 and no input, so the state passes
through. Each kernel recomputes the chunk's cumsum from dt: L floats, cheaper than a round trip through memory.

Forward dots take their operands in x's dtype when it is 16-bit (tensor cores, as mamba_ssm does) and in
float32 with IEEE precision otherwise (no TF32: the fp32 path must match the eager path to fp32 rounding);
the backward's dots take float32 operands (TF32 on a GPU for 16-bit inputs); accumulation is float32.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk_cumsum(DT, A, pid_b, h, t, valid, stride_dt_b, stride_dt_t, stride_dt_h):
    # (BLOCK_L,) dt and the cumulative sum of dt A over the chunk's rows (0 past the valid ones)
    dt = tl.load(DT + pid_b * stride_dt_b + t * stride_dt_t + h * stride_dt_h, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(A + h).to(tl.float32)
    return dt, tl.cumsum(dt * a, axis=0)


@triton.jit
def _chunk_resets(RST, pid_b, t, valid, stride_r_b, stride_r_t, HAS_RESET: tl.constexpr):
    # (BLOCK_L,) count of resets at or before each row of the chunk, and the chunk's total. A reset at t drops
    # the state before t, so the decay from s to l (s <= l) is zero unless the counts at s and l agree.
    if HAS_RESET:
        r = tl.load(RST + pid_b * stride_r_b + t * stride_r_t, mask=valid, other=0).to(tl.int32)
        return tl.cumsum(r, axis=0), tl.sum(r, axis=0)
    zero = tl.zeros(t.shape, tl.int32)
    return zero, tl.sum(zero, axis=0)


@triton.jit
def _ssd_state_kernel(
    X, DT, A, BM, STATES, RST,
    T, H, P, N, L, HPG,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h,
    stride_bm_b, stride_bm_t, stride_bm_g, stride_bm_n,
    stride_s_b, stride_s_k, stride_s_h, stride_s_p, stride_s_n,
    stride_r_b, stride_r_t,
    FROM_START: tl.constexpr, HAS_RESET: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (chunk k, b * H + h, P x N tile) writes STATES[b, k, h, p, n] (float32): the chunk's final
    # state from zero. HPG = H // G heads per group of B. The backward reuses it with FROM_START, X = dy
    # and BM = C: sum_l exp(A_cum[l]) dy_l C_l^T, the output's gradient into the state entering the chunk.
    pid_k, pid_bh, pid_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_b, h = pid_bh // H, pid_bh % H
    n_tiles = tl.cdiv(N, BLOCK_N)
    p = (pid_pn // n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    n = (pid_pn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    rows = tl.arange(0, BLOCK_L)
    t = pid_k * L + rows  # (BLOCK_L,)
    valid = (rows < L) & (t < T)
    dt, a_cum = _chunk_cumsum(DT, A, pid_b, h, t, valid, stride_dt_b, stride_dt_t, stride_dt_h)
    total = tl.sum(tl.where(valid, dt, 0.0) * tl.load(A + h).to(tl.float32), axis=0)
    rc, rc_end = _chunk_resets(RST, pid_b, t, valid, stride_r_b, stride_r_t, HAS_RESET)
    if FROM_START:
        w = tl.where(valid & (rc == 0), tl.exp(a_cum), 0.0)  # (BLOCK_L,): the decay from the chunk's start to l
    else:
        w = tl.where(valid & (rc == rc_end), dt * tl.exp(total - a_cum), 0.0)  # dt_l times the decay to the end
    x_ptr = X + pid_b * stride_x_b + t[:, None] * stride_x_t + h * stride_x_h + p[None, :] * stride_x_p
    x = tl.load(x_ptr, mask=valid[:, None] & (p[None, :] < P), other=0.0)  # (BLOCK_L, BLOCK_P)
    b_ptr = BM + pid_b * stride_bm_b + t[:, None] * stride_bm_t + (h // HPG) * stride_bm_g + n[None, :] * stride_bm_n
    bm = tl.load(b_ptr, mask=valid[:, None] & (n[None, :] < N), other=0.0)  # (BLOCK_L, BLOCK_N)
    xw = (x.to(tl.float32) * w[:, None]).to(X.dtype.element_ty)
    if IEEE:
        state = tl.dot(tl.trans(xw), bm.to(xw.dtype), input_precision="ieee")  # (BLOCK_P, BLOCK_N)
    else:
        state = tl.dot(tl.trans(xw), bm.to(xw.dtype))
    s_ptr = STATES + pid_b * stride_s_b + pid_k * stride_s_k + h * stride_s_h
    tl.store(s_ptr + p[:, None] * stride_s_p + n[None, :] * stride_s_n, state, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _ssd_carry_kernel(
    DT, A, STATES, H0, H_LAST, RST,
    T, H, P, N, L, K,
    stride_dt_b, stride_dt_t, stride_dt_h, stride_r_b, stride_r_t,
    stride_s_b, stride_s_k, stride_s_h, stride_s_p, stride_s_n,
    stride_h0_b, stride_h0_h, stride_h0_p, stride_h0_n,
    stride_hl_b, stride_hl_h, stride_hl_p, stride_hl_n,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program (b * H + h, block of the flattened P * N state) walks the K chunks in order; STATES[b, k, h]
    # holds chunk k's own final state on entry and the state entering chunk k on exit. H_LAST in its dtype.
    # REVERSE (the backward): from the last chunk, H0 = dh_last, STATES the chunks' local gradients; on exit
    # STATES[k] is the gradient into chunk k's final state and H_LAST the gradient into h0.
    pid_bh, pid_e = tl.program_id(0), tl.program_id(1)
    pid_b, h = pid_bh // H, pid_bh % H
    e = pid_e * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index p * N + n
    p, n = e // N, e % N
    mask = e < P * N
    if HAS_H0:
        h0_ptr = H0 + pid_b * stride_h0_b + h * stride_h0_h + p * stride_h0_p + n * stride_h0_n
        carry = tl.load(h0_ptr, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK,), tl.float32)
    a = tl.load(A + h).to(tl.float32)
    rows = tl.arange(0, BLOCK_L)
    s_ptr = STATES + pid_b * stride_s_b + h * stride_s_h + p * stride_s_p + n * stride_s_n
    for i in range(0, K):
        k = K - 1 - i if REVERSE else i
        t = k * L + rows
        valid = (rows < L) & (t < T)
        dt = tl.load(DT + pid_b * stride_dt_b + t * stride_dt_t + h * stride_dt_h, mask=valid, other=0.0)
        decay = tl.exp(tl.sum(dt.to(tl.float32), axis=0) * a)  # the chunk's total decay
        _, rc_end = _chunk_resets(RST, pid_b, t, valid, stride_r_b, stride_r_t, HAS_RESET)
        decay = tl.where(rc_end == 0, decay, 0.0)
        own = tl.load(s_ptr + k * stride_s_k, mask=mask, other=0.0)
        tl.store(s_ptr + k * stride_s_k, carry, mask=mask)
        carry = decay * carry + own
    hl_ptr = H_LAST + pid_b * stride_hl_b + h * stride_hl_h + p * stride_hl_p + n * stride_hl_n
    tl.store(hl_ptr, carry.to(H_LAST.dtype.element_ty), mask=mask)


@triton.jit
def _ssd_output_kernel(
    X, DT, A, BM, CM, STATES, Y, RST,
    T, H, P, N, L, HPG,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h,
    stride_bm_b, stride_bm_t, stride_bm_g, stride_bm_n,
    stride_cm_b, stride_cm_t, stride_cm_g, stride_cm_n,
    stride_s_b, stride_s_k, stride_s_h, stride_s_p, stride_s_n,
    stride_y_b, stride_y_t, stride_y_h, stride_y_p,
    stride_r_b, stride_r_t,
    HAS_RESET: tl.constexpr, IEEE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (chunk k, b * H + h, P tile) writes Y[b, t, h, p] for the chunk's rows, looping over N in
    # BLOCK_N slices for both C B^T (BLOCK_L, BLOCK_L) and C S_in^T (BLOCK_L, BLOCK_P).
    pid_k, pid_bh, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_b, h = pid_bh // H, pid_bh % H
    g = h // HPG
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = tl.arange(0, BLOCK_L)
    t = pid_k * L + rows
    valid = (rows < L) & (t < T)
    dt, a_cum = _chunk_cumsum(DT, A, pid_b, h, t, valid, stride_dt_b, stride_dt_t, stride_dt_h)
    dtype = X.dtype.element_ty
    scores = tl.zeros((BLOCK_L, BLOCK_L), tl.float32)
    from_state = tl.zeros((BLOCK_L, BLOCK_P), tl.float32)
    s_base = STATES + pid_b * stride_s_b + pid_k * stride_s_k + h * stride_s_h
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n[None, :] < N
        c_ptr = CM + pid_b * stride_cm_b + t[:, None] * stride_cm_t + g * stride_cm_g + n[None, :] * stride_cm_n
        b_ptr = BM + pid_b * stride_bm_b + t[:, None] * stride_bm_t + g * stride_bm_g + n[None, :] * stride_bm_n
        cm = tl.load(c_ptr, mask=valid[:, None] & mask_n, other=0.0).to(dtype)  # (BLOCK_L, BLOCK_N)
        bm = tl.load(b_ptr, mask=valid[:, None] & mask_n, other=0.0).to(dtype)
        s_ptr = s_base + p[:, None] * stride_s_p + n[None, :] * stride_s_n
        s_in = tl.load(s_ptr, mask=(p[:, None] < P) & mask_n, other=0.0).to(dtype)  # (BLOCK_P, BLOCK_N)
        if IEEE:
            scores += tl.dot(cm, tl.trans(bm), input_precision="ieee")
            from_state += tl.dot(cm, tl.trans(s_in), input_precision="ieee")
        else:
            scores += tl.dot(cm, tl.trans(bm))
            from_state += tl.dot(cm, tl.trans(s_in))
    rc, _ = _chunk_resets(RST, pid_b, t, valid, stride_r_b, stride_r_t, HAS_RESET)
    causal = (rows[None, :] <= rows[:, None]) & (rc[None, :] == rc[:, None])  # (BLOCK_L, BLOCK_L): s <= l, no reset
    decay = tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf")))
    weights = (scores * decay).to(dtype)
    x_ptr = X + pid_b * stride_x_b + t[:, None] * stride_x_t + h * stride_x_h + p[None, :] * stride_x_p
    x = tl.load(x_ptr, mask=valid[:, None] & (p[None, :] < P), other=0.0)
    xdt = (x.to(tl.float32) * dt[:, None]).to(dtype)  # (BLOCK_L, BLOCK_P): the discretised input
    if IEEE:
        y = tl.dot(weights, xdt, input_precision="ieee")
    else:
        y = tl.dot(weights, xdt)
    y += tl.where(rc == 0, tl.exp(a_cum), 0.0)[:, None] * from_state
    y_ptr = Y + pid_b * stride_y_b + t[:, None] * stride_y_t + h * stride_y_h + p[None, :] * stride_y_p
    tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=valid[:, None] & (p[None, :] < P))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 operands: IEEE for float32 inputs, TF32 tensor cores on a GPU for 16-bit ones
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _ssd_bwd_kernel(
    X, DT, A, BM, CM, DY, STATES, DSTATES, DX, DDT, DB, DC, DA, RST,
    T, H, P, N, L, K, HPG,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h,
    stride_bm_b, stride_bm_t, stride_bm_g, stride_bm_n,
    stride_cm_b, stride_cm_t, stride_cm_g, stride_cm_n,
    stride_dy_b, stride_dy_t, stride_dy_h, stride_dy_p,
    stride_s_b, stride_s_k, stride_s_h, stride_s_p, stride_s_n,
    stride_r_b, stride_r_t,
    HAS_RESET: tl.constexpr, IEEE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (chunk k, b * H + h) owns all of P (BLOCK_P >= P) and walks N in BLOCK_N slices twice: first
    # the sums over N, then the per-N gradients. STATES[b, k, h] = S_in (the state entering the chunk),
    # DSTATES[b, k, h] = dS_out (the gradient into its final state). With X_s = dt_s x_s,
    # W = (C B^T) o decay, M = dy X^T, e_in = exp(A_cum), e_out = exp(A_cum[end] - A_cum):
    #   dX = W^T dy + e_out (B dS_out^T)     dC = (M o decay) B + e_in (dy S_in)
    #   dB = (M o decay)^T C + e_out (X dS_out)
    # and the log-decay gradient d A_cum from every exp above, summed back through the cumsum into dt A.
    # Writes DX (x's dtype), DDT (float32, B T H), DB and DC per head (float32, B T H N), DA[b * H + h, k].
    pid_k, pid_bh = tl.program_id(0), tl.program_id(1)
    pid_b, h = pid_bh // H, pid_bh % H
    g = h // HPG
    p = tl.arange(0, BLOCK_P)
    rows = tl.arange(0, BLOCK_L)
    t = pid_k * L + rows
    valid = (rows < L) & (t < T)
    mask_p = valid[:, None] & (p[None, :] < P)  # (BLOCK_L, BLOCK_P)
    dt, a_cum = _chunk_cumsum(DT, A, pid_b, h, t, valid, stride_dt_b, stride_dt_t, stride_dt_h)
    a = tl.load(A + h).to(tl.float32)
    total = tl.sum(dt * a, axis=0)
    x_off = pid_b * stride_x_b + t[:, None] * stride_x_t + h * stride_x_h + p[None, :] * stride_x_p
    x = tl.load(X + x_off, mask=mask_p, other=0.0).to(tl.float32)
    xdt = x * dt[:, None]  # (BLOCK_L, BLOCK_P)
    dy_ptr = DY + pid_b * stride_dy_b + t[:, None] * stride_dy_t + h * stride_dy_h + p[None, :] * stride_dy_p
    dy = tl.load(dy_ptr, mask=mask_p, other=0.0).to(tl.float32)
    b_base = BM + pid_b * stride_bm_b + t[:, None] * stride_bm_t + g * stride_bm_g
    c_base = CM + pid_b * stride_cm_b + t[:, None] * stride_cm_t + g * stride_cm_g
    s_base = pid_b * stride_s_b + pid_k * stride_s_k + h * stride_s_h + p[:, None] * stride_s_p

    # pass 1, the sums over N: C_l . B_s, S_in C_l, dS_out B_s and dS_out : S_in
    scores = tl.zeros((BLOCK_L, BLOCK_L), tl.float32)
    c_s = tl.zeros((BLOCK_L, BLOCK_P), tl.float32)
    b_ds = tl.zeros((BLOCK_L, BLOCK_P), tl.float32)
    ds_dot_s = tl.zeros((BLOCK_P,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = valid[:, None] & (n[None, :] < N)  # (BLOCK_L, BLOCK_N)
        mask_pn = (p[:, None] < P) & (n[None, :] < N)  # (BLOCK_P, BLOCK_N)
        bm = tl.load(b_base + n[None, :] * stride_bm_n, mask=mask_n, other=0.0).to(tl.float32)
        cm = tl.load(c_base + n[None, :] * stride_cm_n, mask=mask_n, other=0.0).to(tl.float32)
        s_in = tl.load(STATES + s_base + n[None, :] * stride_s_n, mask=mask_pn, other=0.0)
        ds_out = tl.load(DSTATES + s_base + n[None, :] * stride_s_n, mask=mask_pn, other=0.0)
        scores += _dot(cm, tl.trans(bm), IEEE)
        c_s += _dot(cm, tl.trans(s_in), IEEE)
        b_ds += _dot(bm, tl.trans(ds_out), IEEE)
        ds_dot_s += tl.sum(ds_out * s_in, axis=1)

    # resets zero some decays: those are constants, so their terms below simply vanish
    rc, rc_end = _chunk_resets(RST, pid_b, t, valid, stride_r_b, stride_r_t, HAS_RESET)
    causal = (rows[None, :] <= rows[:, None]) & (rc[None, :] == rc[:, None])  # (BLOCK_L, BLOCK_L)
    decay = tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf")))
    e_in = tl.where(valid & (rc == 0), tl.exp(a_cum), 0.0)  # (BLOCK_L,)
    e_out = tl.where(valid & (rc == rc_end), tl.exp(total - a_cum), 0.0)
    e_total = tl.where(rc_end == 0, tl.exp(total), 0.0)  # the chunk's decay as the carry uses it
    md = _dot(dy, tl.trans(xdt), IEEE) * decay  # (BLOCK_L, BLOCK_L): (dy_l . X_s) decay
    d_xdt = _dot(tl.trans(scores * decay), dy, IEEE) + e_out[:, None] * b_ds  # (BLOCK_L, BLOCK_P)

    # d A_cum: +rows -columns of scores o M o decay; e_in's and e_out's terms; the chunk end's own gradient
    q = scores * md
    u = e_out * tl.sum(xdt * b_ds, axis=1)  # (BLOCK_L,)
    d_cum = tl.sum(q, axis=1) - tl.sum(q, axis=0) + e_in * tl.sum(dy * c_s, axis=1) - u
    d_end = tl.sum(u, axis=0) + e_total * tl.sum(ds_dot_s, axis=0)
    d_log = tl.sum(d_cum, axis=0) - tl.cumsum(d_cum, axis=0) + d_cum + d_end  # (BLOCK_L,): d (dt_r A)
    d_log = tl.where(valid, d_log, 0.0)
    dx_off = ((pid_b * T + t[:, None]) * H + h) * P + p[None, :]  # (B, T, H, P) contiguous, whatever x's strides
    tl.store(DX + dx_off, (d_xdt * dt[:, None]).to(DX.dtype.element_ty), mask=mask_p)
    ddt = tl.sum(d_xdt * x, axis=1) + d_log * a
    tl.store(DDT + pid_b * (T * H) + t * H + h, ddt, mask=valid)  # (B, T, H) contiguous
    tl.store(DA + pid_bh * K + pid_k, tl.sum(d_log * dt, axis=0))

    # pass 2, the per-N gradients of B and C
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = valid[:, None] & (n[None, :] < N)
        mask_pn = (p[:, None] < P) & (n[None, :] < N)
        bm = tl.load(b_base + n[None, :] * stride_bm_n, mask=mask_n, other=0.0).to(tl.float32)
        cm = tl.load(c_base + n[None, :] * stride_cm_n, mask=mask_n, other=0.0).to(tl.float32)
        s_in = tl.load(STATES + s_base + n[None, :] * stride_s_n, mask=mask_pn, other=0.0)
        ds_out = tl.load(DSTATES + s_base + n[None, :] * stride_s_n, mask=mask_pn, other=0.0)
        dc = _dot(md, bm, IEEE) + e_in[:, None] * _dot(dy, s_in, IEEE)  # (BLOCK_L, BLOCK_N)
        db = _dot(tl.trans(md), cm, IEEE) + e_out[:, None] * _dot(xdt, ds_out, IEEE)
        hn = (pid_b * T + t[:, None]) * (H * N) + h * N + n[None, :]  # (B, T, H, N) contiguous
        tl.store(DB + hn, db, mask=mask_n)
        tl.store(DC + hn, dc, mask=mask_n)
