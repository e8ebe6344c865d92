"""Triton kernel of the top-k (sparse teacher) KD loss; the math is ``kdfast.functional.topk_kd_loss``.

One program per row: pass 1 is the student's online log-sum-exp (at T, and at 1 for CE when T != 1);
the teacher's k log-probabilities and the student at their k classes are gathered in one
``KBLOCK``-wide vector; pass 2 writes the dense gradient ``(s/T) P q_j (+ CE's softmax)``; after a
barrier, the k teacher columns (and the label's) are rewritten with their full value. No host sync.

``TAIL`` (the teacher's log-probabilities as given): the leftover masses ``Pt = 1 - sum_k p_k`` and
``Qt = sum_{j not in K} q_j`` are one more bucket, ``D += s Pt (log Pt - log Qt)``. ``Pt = -expm1(lse_k
lp)``; ``Qt`` from the non-K sum of exponentials ``S - sum_K e^{a - M}``, and where that subtraction
lost more than 3 bits (the student holds more than 7/8 of its mass on K), from a sweep of its own over
the row with the K columns masked out (``tl.histogram`` of the k classes over the block's columns):
an online lse of the non-K columns relative to their own max. The gradient, derived in
``csrc/row_kernel_more.h`` (``row_topk``) and ``docs/kernel-math.md``: ``(s/T)(q_j - p_j)`` on K,
``(s/T)(Qt - Pt) q_j / Qt`` elsewhere, ``q_j / Qt = exp((a_j - Mt) - lt)`` the non-K softmax.
"""
import triton
import triton.language as tl

from .common import NEG_INF, _finish, _load_row, _lse_update, _safe


@triton.jit
def _topk_kernel(
    z_ptr, lp_ptr, idx_ptr, lab_ptr, kdw_ptr, cew_ptr, gs_ptr, d_ptr, ce_ptr, gz_ptr,
    C, K, stride_z, stride_lp, stride_idx, stride_gz,
    t_hi, t_lo, scale_hi, scale_lo,   # fp32 head + remainder of the Python floats (fp64 path)
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_SHARED: tl.constexpr,   # T == 1: CE's lse(z) is the student lse
    RENORM: tl.constexpr,      # teacher = softmax(lp / T) over its k classes, else exp(lp) as given
    TAIL: tl.constexpr,        # the leftover masses as a (k+1)-th bucket (not with RENORM)
    NEED_GZ: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    T = tl.cast(t_hi, ACC) + tl.cast(t_lo, ACC)
    s = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    iT = 1.0 / T

    if HAS_LABELS:
        y = tl.load(lab_ptr + row)
        ignored = y == ignore_index
        bad = ((y < 0) | (y >= C)) & (y != ignore_index)
        y = tl.where(ignored | bad, 0, y).to(tl.int32)
    else:
        ignored = row < 0
        bad = row < 0
        y = (row * 0 - 1).to(tl.int32)
    live = (ignored | bad) == 0

    # the teacher's k entries; a class outside [0, C) makes the row NaN (and is never dereferenced)
    kk = tl.arange(0, KBLOCK)
    kin = kk < K
    ix = tl.load(idx_ptr + row * stride_idx + kk, mask=kin, other=0)
    bad = bad | (tl.sum((((ix < 0) | (ix >= C)) & kin).to(tl.int32), 0) > 0)
    live = (ignored | bad) == 0
    # live extents (C or K, 0 for an ignored / bad row): one comparison per mask, as in kernel.py
    lim = tl.where(live, C, 0)
    kmask = kk < tl.where(live, K, 0)
    ix = tl.where(kmask, ix, 0)

    zero = tl.sum(tl.zeros([BLOCK], ACC), 0)
    m_a = zero + NEG_INF
    s_a = zero
    m_1 = zero + NEG_INF
    s_1 = zero
    # ---- pass 1: lse(z / T) (and lse(z) for CE when T != 1) ----
    for start in range(0, C, BLOCK):
        offs = start + cols
        x = _load_row(z_row, offs, offs < lim, ACC)
        m_a, s_a, _r, _e = _lse_update(m_a, s_a, x * iT)
        if HAS_CE and not CE_SHARED:
            m_1, s_1, _r1, _e1 = _lse_update(m_1, s_1, x)
    # maxima and log-sums kept apart (docs/kernel-math.md): log q_j = (a_j - m_a) - la, never
    # a_j - lse with lse = m_a + la rounded as one float (its error grows with the logits' offset)
    mas = _safe(m_a)
    la = tl.log(s_a)
    m1s = mas
    l1 = la
    if HAS_CE:
        if not CE_SHARED:
            m1s = _safe(m_1)
            l1 = tl.log(s_1)
        zy = tl.load(z_row + y, mask=live, other=0.0).to(ACC)
        ce = (m1s - zy) + l1
    else:
        zy = zero
        ce = zero

    # ---- the teacher: log p_k, p_k; the student at the k classes (read before any gradient write:
    # grad_z may alias z) ----
    lp = tl.load(lp_ptr + row * stride_lp + kk, mask=kmask, other=NEG_INF).to(ACC)
    if RENORM:
        t = lp * iT
        mt = tl.max(t, 0)
        mt_safe = tl.where(mt == NEG_INF, 0.0, mt)
        # a row of -inf entries only (no teacher mass) keeps log p = -inf: p = 0, D = 0
        logp = tl.where(t == NEG_INF, NEG_INF, t - (mt_safe + tl.log(tl.sum(tl.exp(t - mt_safe), 0))))
    else:
        logp = lp
    p = tl.exp(logp)
    zk = tl.load(z_row + ix, mask=kmask, other=0.0).to(ACC)
    Pm = tl.sum(p, 0)
    # D = s sum_k p_k (log p_k - log q_{i_k}), log q_{i_k} = (a_{i_k} - m_a) - la; p_k = 0 adds 0
    logqk = (zk * iT - mas) - la
    Dk = tl.sum(tl.where(p > 0, p * (logp - logqk), 0.0), 0)
    dM = mas   # the dense gradient term's offsets: exp((a_j - dM) - dl)
    dl = la
    if TAIL:
        fin = kmask & (lp > NEG_INF)   # K: the finite entries (a -inf entry is padding: tail)
        # Pt = 1 - sum_k p_k = -expm1(L), L = lse_k(lp); expm1 from exp and log (Kahan):
        # expm1(x) = (u - 1) x / log u with u = e^x (the rounding of u cancels in the ratio). The k
        # values in float64 whatever ACC (k exps per row): the fp32 sum's rounding, ~eps, would reach
        # the loss times log(Pt / Qt) (~100 for a saturated student), well above the other terms'.
        lpf = tl.where(fin, lp, NEG_INF).to(tl.float64)
        ml = tl.max(lpf, 0)
        ml_s = tl.where(ml == NEG_INF, 0.0, ml)
        L = ml_s + tl.log(tl.sum(tl.exp(lpf - ml_s), 0))
        u = tl.exp(L)
        em1 = tl.where(u == 1.0, L, (u - 1.0) * L / tl.log(u))
        em1 = tl.where(L == NEG_INF, -1.0, em1)
        Pt = tl.maximum(-em1, 0.0)
        St = s_a - tl.sum(tl.where(fin, tl.exp(zk * iT - mas), 0.0), 0)
        Mt = mas
        if St <= 0.125 * s_a:
            # ... or, where that lost more than 3 bits, a masked online lse of the non-K columns
            m_t = zero + NEG_INF
            s_t = zero
            for start in range(0, C, BLOCK):
                offs = start + cols
                x = _load_row(z_row, offs, offs < lim, ACC)
                rel = (ix - start).to(tl.int32)
                hit = tl.histogram(rel, BLOCK, mask=fin & (rel >= 0) & (rel < BLOCK))
                m_t, s_t, _rt, _et = _lse_update(m_t, s_t, tl.where(hit > 0, NEG_INF, x * iT))
            Mt = _safe(m_t)
            St = s_t
        lt = tl.log(St)
        # (float64 like Pt: Mt - M is exact there, and the tail term keeps Pt's accuracy)
        logQt = (Mt.to(tl.float64) - mas.to(tl.float64)) + lt.to(tl.float64) - la.to(tl.float64)
        # 0 log 0 = 0; no non-K column (k = C): no tail bucket (a leftover Pt is rounding)
        has_t = lt > NEG_INF
        Dk += tl.where((Pt > 0) & has_t, Pt * (tl.log(Pt) - logQt), 0.0).to(ACC)
        dM = tl.where(has_t, Mt, mas)
        dl = tl.where(has_t, lt, la)
    D = s * Dk

    g = tl.load(gs_ptr).to(ACC)
    gk = g * tl.load(kdw_ptr + row).to(ACC)
    gc = g * tl.load(cew_ptr + row).to(ACC)
    if NEED_GZ:
        # dD/dz_j = (s/T)(P q_j - p_j [j in top-k]); dCE/dz_j = softmax(z)_j - [j = y]
        cp = gk * s * iT
        cq = cp * Pm
        if TAIL:   # non-K columns: (s/T)(Qt - Pt) exp((a_j - Mt) - lt); none with mass: 0
            cq = tl.where(has_t, cp * (tl.exp(logQt) - Pt).to(ACC), 0.0)
        gz_row = gz_ptr + row * stride_gz
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb = offs < C
            x = _load_row(z_row, offs, offs < lim, ACC)
            q = tl.exp((x * iT - dM) - dl)
            gz = cq * q
            if HAS_CE:
                if CE_SHARED and not TAIL:
                    gz += gc * q
                else:
                    gz += gc * tl.exp((x - m1s) - l1)
            gz = _finish(gz, ignored, bad)
            tl.store(gz_row + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        tl.debug_barrier()   # the dense stores above before the rewrites of single columns below
        if TAIL:   # K columns: (s/T)(q_j - p_j); a padding entry's class keeps the dense value;
            # no tail bucket (k = C): the tail-less (s/T)(P q_j - p_j) (P + Pt = 1 needs the bucket)
            qK = tl.where(has_t, 1.0, Pm)
            gzk = cp * (qK * tl.exp(logqk) - p)
            kmask = kmask & fin
        else:
            gzk = cq * tl.exp(logqk) - cp * p
        if HAS_CE:
            gzk += gc * tl.exp((zk - m1s) - l1)
            # the label column: its dense value, -g_ce, and the teacher's term if y is a top-k class
            py = tl.sum(tl.where(kmask & (ix == y), p, 0.0), 0)
            if TAIL:
                y_in = tl.sum((kmask & (ix == y)).to(tl.int32), 0) > 0
                gy = tl.where(y_in, cp * (qK * tl.exp((zy * iT - mas) - la) - py),
                              cq * tl.exp((zy * iT - dM) - dl))
            else:
                gy = cq * tl.exp((zy * iT - mas) - la) - cp * py
            gy += gc * (tl.exp((zy - m1s) - l1) - 1.0)
            tl.store(gz_row + y, gy.to(gz_ptr.dtype.element_ty), mask=live)
            kmask = kmask & (ix != y)   # written above: one store per address
        tl.store(gz_row + ix, gzk.to(gz_ptr.dtype.element_ty), mask=kmask)

    tl.store(d_ptr + row, _finish(D, ignored, bad))
    tl.store(ce_ptr + row, _finish(ce, ignored, bad))
