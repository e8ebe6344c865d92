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
``csrc/kinds/topk.h`` (``row_topk``) and ``docs/kernel-math.md``: ``(s/T)(q_j - p_j)`` on K,
``(s/T)(Qt - Pt) q_j / Qt`` elsewhere, ``q_j / Qt = exp((a_j - Mt) - lt)`` the non-K softmax.

``DIV`` (``kdfast._spec.Divergence``): FORWARD is the above (``topk_kd``); REVERSE (KL(Q || P),
``topk_reverse_kd``) and JSD (``topk_jsd``, 0 < beta < 1) take two distributions on the support
buckets: with ``RENORM`` the k finite entries, teacher and student both renormalised over them (the
student from its k gathered logits alone: pass 1 runs only for CE, and the dense gradient is CE's
part or 0); with ``TAIL`` the k + 1 buckets (the student renormalised over them in float64). The
bucket arithmetic is float64 whatever ACC (k + 1 terms per row), the losses as sums of nonnegative
``w phi(x)`` terms, the gradient ``(s/T) w_b (q_j / Q_b)`` (derivation in ``csrc/kinds/topk.h``).
"""
import triton
import triton.language as tl

from .common import NEG_INF, _finish, _load_row, _log1p, _lse_update, _phi_term, _safe

# the divergence (DIV, == kdfast._spec.Divergence)
DIV_FORWARD: tl.constexpr = tl.constexpr(0)
DIV_REVERSE: tl.constexpr = tl.constexpr(1)
DIV_JSD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _expm1(x):
    """e^x - 1 from exp and log (Kahan): (u - 1) x / log u with u = e^x (the rounding of u cancels
    in the ratio); -1 at -inf."""
    u = tl.exp(x)
    r = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return tl.where(x == NEG_INF, -1.0, r)


@triton.jit
def _rev_bucket(lQ, lP):
    """Reverse KL on buckets with log-probabilities lQ (student), lP (teacher), float64: the loss
    term Q phi(-d) >= 0 (Q e^{-d} = P: ``_phi_term``'s ``big``; Q = 0 adds P), Q, and d = lQ - lP."""
    Q = tl.exp(lQ)
    d = lQ - lP
    return _phi_term(Q, d, tl.exp(lP), tl.float64), Q, d


@triton.jit
def _jsd_bucket(lQ, lP, lb, l1b, beta):
    """Generalised JSD on buckets (float64; lb = log beta, l1b = log(1 - beta)), in log space
    (docs/kernel-math.md, rule 4): delta = log(beta P / ((1 - beta) Q)), sp(x) = log(1 + e^x),
    hq = log Q - log M = -l1b - sp(delta), hp = log P - log M = -lb - sp(-delta), both sp from one
    log1p. Returns the loss term beta P phi(-hp) + (1 - beta) Q phi(-hq) >= 0 (P e^{-hp} = Q e^{-hq}
    = M; a zero side adds M), Q, and sp(delta) (hq up to the constant)."""
    Q = tl.exp(lQ)
    delta = (lb - l1b) + (lP - lQ)
    l1 = _log1p(tl.exp(-tl.abs(delta)))
    spd = tl.maximum(delta, 0.0) + l1
    spn = tl.maximum(-delta, 0.0) + l1
    x = lb + lP
    y = l1b + lQ
    mm = tl.maximum(x, y)
    lM = tl.where(mm == NEG_INF, NEG_INF, mm + _log1p(tl.exp(-tl.abs(x - y))))
    M = tl.exp(lM)
    term = (beta * _phi_term(tl.exp(lP), -(lb + spn), M, tl.float64)
            + (1.0 - beta) * _phi_term(Q, -(l1b + spd), M, tl.float64))
    return term, Q, spd


@triton.jit
def _topk_kernel(
    z_ptr, lp_ptr, idx_ptr, lab_ptr, kdw_ptr, cew_ptr, gs_ptr, d_ptr, ce_ptr, gz_ptr,
    C, K, stride_z, stride_lp, stride_idx, stride_gz,
    t_hi, t_lo, scale_hi, scale_lo,   # fp32 head + remainder of the Python floats (fp64 path)
    beta_hi, beta_lo,                 # JSD's beta, likewise
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_SHARED: tl.constexpr,   # T == 1: CE's lse(z) is the student lse
    RENORM: tl.constexpr,      # teacher = softmax(lp / T) over its k classes, else exp(lp) as given
    TAIL: tl.constexpr,        # the leftover masses as a (k+1)-th bucket (not with RENORM)
    DIV: tl.constexpr,         # DIV_FORWARD / DIV_REVERSE / DIV_JSD (the last two: RENORM or TAIL)
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
    # ---- pass 1: lse(z / T) (and lse(z) for CE when T != 1). Reverse / JSD over the k renormalised
    # entries need only the k logits: then the pass runs for CE alone ----
    if DIV == DIV_FORWARD or TAIL or HAS_CE:
        for start in range(0, C, BLOCK):
            offs = start + cols
            x = _load_row(z_row, offs, offs < lim, ACC)
            if DIV == DIV_FORWARD or TAIL or CE_SHARED:
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
    zk = tl.load(z_row + ix, mask=kmask, other=0.0).to(ACC)
    fin = kmask & (lp > NEG_INF)   # K: the finite entries (a -inf entry is padding)
    if DIV == DIV_FORWARD or TAIL:
        # log q_{i_k} = (a_{i_k} - m_a) - la
        logqk = (zk * iT - mas) - la
    if DIV == DIV_FORWARD:
        if RENORM:
            t = lp * iT
            mt = tl.max(t, 0)
            mt_safe = tl.where(mt == NEG_INF, 0.0, mt)
            # a row of -inf entries only (no teacher mass) keeps log p = -inf: p = 0, D = 0. The max
            # subtracted first (exact at the max), then the log-sum: never t - (rounded lse), whose
            # rounding eps |mt| shifts every log p alike and reaches the loss whole (rule 1)
            logp = tl.where(t == NEG_INF, NEG_INF, (t - mt_safe) - tl.log(tl.sum(tl.exp(t - mt_safe), 0)))
        else:
            logp = lp
        p = tl.exp(logp)
        Pm = tl.sum(p, 0)
        # D = s sum_k p_k (log p_k - log q_{i_k}); p_k = 0 adds 0
        Dk = tl.sum(tl.where(p > 0, p * (logp - logqk), 0.0), 0)
    dM = mas   # the dense gradient term's offsets: exp((a_j - dM) - dl)
    dl = la
    if TAIL:
        # Pt = 1 - sum_k p_k = -expm1(L), L = lse_k(lp); expm1 from exp and log (Kahan):
        # expm1(x) = (u - 1) x / log u with u = e^x (the rounding of u cancels in the ratio). The k
        # values in float64 whatever ACC (k exps per row): the fp32 sum's rounding, ~eps, would reach
        # the loss times log(Pt / Qt) (~100 for a saturated student), well above the other terms'.
        lpf = tl.where(fin, lp, NEG_INF).to(tl.float64)
        ml = tl.max(lpf, 0)
        ml_s = tl.where(ml == NEG_INF, 0.0, ml)
        L = ml_s + tl.log(tl.sum(tl.exp(lpf - ml_s), 0))
        Pt = tl.maximum(-_expm1(L), 0.0)
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
        if DIV == DIV_FORWARD:
            Dk += tl.where((Pt > 0) & has_t, Pt * (tl.log(Pt) - logQt), 0.0).to(ACC)
        dM = tl.where(has_t, Mt, mas)
        dl = tl.where(has_t, lt, la)
    if DIV != DIV_FORWARD:
        # ---- reverse / JSD over the buckets, float64 (csrc/kinds/topk.h, docs/kernel-math.md TOPK):
        # per finite entry log P_k, log Q_k; tail: and the tail bucket (Pt, Qt) ----
        if RENORM:
            # both renormalised over K, exact at each max; the student from its k logits alone,
            # a_k = z_k / T in float64 (pass 1 ran for CE only)
            T64 = tl.cast(t_hi, tl.float64) + tl.cast(t_lo, tl.float64)
            tp = tl.where(fin, lp.to(tl.float64) / T64, NEG_INF)
            ta = tl.where(fin, zk.to(tl.float64) / T64, NEG_INF)
            mp = _safe(tl.max(tp, 0))
            ma = _safe(tl.max(ta, 0))
            lPk = (tp - mp) - tl.log(tl.sum(tl.exp(tp - mp), 0))
            lQk = (ta - ma) - tl.log(tl.sum(tl.exp(ta - ma), 0))
            lPs = 0.0   # log sum P
        else:
            lPk = tl.where(fin, lp.to(tl.float64), NEG_INF)
            lQk = tl.where(fin, logqk.to(tl.float64), NEG_INF)   # a_k rounded as its lane
            lPt = tl.where(has_t, tl.log(Pt), NEG_INF)
            lQt = tl.where(has_t, logQt, NEG_INF)
            # Q renormalised to sum 1 (the fp32 lse's rounding is common to every bucket)
            lqs = tl.log(tl.sum(tl.exp(lQk), 0) + tl.exp(lQt))
            lQk = lQk - lqs
            lQt = lQt - lqs
            # sum P = e^L + Pt = max(e^L, 1) with the tail bucket (Pt clamped at 0), e^L without it
            lPs = tl.where(has_t, tl.maximum(L, 0.0), L)
        if DIV == DIV_REVERSE:
            # KL(Q || P) = sum_b Q_b phi(-d_b) + 1 - sum_b P_b (sum Q = 1), terms >= 0
            tk, Qk, wk = _rev_bucket(lQk, lPk)
            X = tl.sum(tl.where(fin, tk, 0.0), 0) - _expm1(lPs)
        else:
            b64 = tl.cast(beta_hi, tl.float64) + tl.cast(beta_lo, tl.float64)
            lb = tl.log(b64)
            l1b = _log1p(-b64)   # (Goldberg's form holds for -1 < x < 0 too)
            tk, Qk, wk = _jsd_bucket(lQk, lPk, lb, l1b, b64)
            X = tl.sum(tl.where(fin, tk, 0.0), 0)
        # gradient weights w_b (derivation: csrc/kinds/topk.h): dD/da_j = s w_b (q_j / Q_b), b the
        # bucket of class j: w_b = Q_b (d_b - dbar) (reverse), (1 - beta) Q_b (spbar - sp_b) (JSD),
        # the means Q-weighted
        okk = fin & (Qk > 0)
        sq = tl.sum(tl.where(okk, Qk, 0.0), 0)
        sw = tl.sum(tl.where(okk, Qk * wk, 0.0), 0)
        if TAIL:
            if DIV == DIV_REVERSE:
                tt, Qt, wt = _rev_bucket(lQt, lPt)
            else:
                tt, Qt, wt = _jsd_bucket(lQt, lPt, lb, l1b, b64)
            okt = has_t & (Qt > 0)
            X += tl.where(has_t, tt, 0.0)
            sq += tl.where(okt, Qt, 0.0)
            sw += tl.where(okt, Qt * wt, 0.0)
        mean = sw / sq
        if DIV == DIV_REVERSE:
            wk = tl.where(okk, Qk * (wk - mean), 0.0)
        else:
            wk = tl.where(okk, (1.0 - b64) * Qk * (mean - wk), 0.0)
        if TAIL:
            if DIV == DIV_REVERSE:
                wt = tl.where(okt, Qt * (wt - mean), 0.0)
            else:
                wt = tl.where(okt, (1.0 - b64) * Qt * (mean - wt), 0.0)
        Dk = X.to(ACC)
    D = s * Dk

    g = tl.load(gs_ptr).to(ACC)
    gk = g * tl.load(kdw_ptr + row).to(ACC)
    gc = g * tl.load(cew_ptr + row).to(ACC)
    if NEED_GZ:
        # dD/dz_j = (s/T)(P q_j - p_j [j in top-k]); dCE/dz_j = softmax(z)_j - [j = y]
        cp = gk * s * iT
        if DIV == DIV_FORWARD:
            cq = cp * Pm
            if TAIL:   # non-K columns: (s/T)(Qt - Pt) exp((a_j - Mt) - lt); none with mass: 0
                cq = tl.where(has_t, cp * (tl.exp(logQt) - Pt).to(ACC), 0.0)
        elif TAIL:   # reverse / JSD, non-K columns: (s/T) w_t exp((a_j - Mt) - lt)
            cq = tl.where(has_t, cp * wt.to(ACC), 0.0)
        else:        # reverse / JSD over the k renormalised entries: 0 outside K
            cq = zero
        gz_row = gz_ptr + row * stride_gz
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb = offs < C
            x = _load_row(z_row, offs, offs < lim, ACC)
            if DIV == DIV_FORWARD or TAIL:
                q = tl.exp((x * iT - dM) - dl)
                gz = cq * q
            else:
                gz = tl.zeros([BLOCK], ACC)
                if HAS_CE and CE_SHARED:   # (softmax(z) at T = 1: pass 1's lse)
                    q = tl.exp((x * iT - dM) - dl)
            if HAS_CE:
                if CE_SHARED and not TAIL:
                    gz += gc * q
                else:
                    gz += gc * tl.exp((x - m1s) - l1)
            gz = _finish(gz, ignored, bad)
            tl.store(gz_row + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        tl.debug_barrier()   # the dense stores above before the rewrites of single columns below
        if DIV != DIV_FORWARD:   # K columns: (s/T) w_k; a padding entry's class keeps the dense value
            gzk = cp * wk.to(ACC)
            kmask = kmask & fin
        elif TAIL:   # K columns: (s/T)(q_j - p_j); a padding entry's class keeps the dense value;
            # no tail bucket (k = C): the tail-less (s/T)(P q_j - p_j) (P + Pt = 1 needs the bucket)
            qK = tl.where(has_t, 1.0, Pm)
            gzk = cp * (qK * tl.exp(logqk) - p)
            kmask = kmask & fin
        else:
            gzk = cq * tl.exp(logqk) - cp * p
        if HAS_CE:
            gzk += gc * tl.exp((zk - m1s) - l1)
            # the label column: its dense value, -g_ce, and the teacher's term if y is a top-k class
            if DIV != DIV_FORWARD:
                y_at = kmask & (ix == y)
                y_in = tl.sum(y_at.to(tl.int32), 0) > 0
                gky = tl.sum(tl.where(y_at, cp * wk.to(ACC), 0.0), 0)
                if TAIL:
                    gy = tl.where(y_in, gky, cq * tl.exp((zy * iT - dM) - dl))
                else:
                    gy = gky
            elif TAIL:
                py = tl.sum(tl.where(kmask & (ix == y), p, 0.0), 0)
                y_in = tl.sum((kmask & (ix == y)).to(tl.int32), 0) > 0
                gy = tl.where(y_in, cp * (qK * tl.exp((zy * iT - mas) - la) - py),
                              cq * tl.exp((zy * iT - dM) - dl))
            else:
                py = tl.sum(tl.where(kmask & (ix == y), p, 0.0), 0)
                gy = cq * tl.exp((zy * iT - mas) - la) - cp * py
            gy += gc * (tl.exp((zy - m1s) - l1) - 1.0)
            tl.store(gz_row + y, gy.to(gz_ptr.dtype.element_ty), mask=live)
            kmask = kmask & (ix != y)   # written above: one store per address
        tl.store(gz_row + ix, gzk.to(gz_ptr.dtype.element_ty), mask=kmask)

    tl.store(d_ptr + row, _finish(D, ignored, bad))
    tl.store(ce_ptr + row, _finish(ce, ignored, bad))
