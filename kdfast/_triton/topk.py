"""Triton kernel of the top-k (sparse teacher) KD loss; the math is ``kdfast.functional.topk_kd_loss``.

One program per row: pass 1 is the student's online log-sum-exp (at T, and at 1 for CE when T != 1);
the teacher's k log-probabilities and the student at their k classes are gathered in one
``KBLOCK``-wide vector; pass 2 writes the dense gradient ``(s/T) P q_j (+ CE's softmax)``; after a
barrier, the k teacher columns (and the label's) are rewritten with their full value. No host sync.
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
    D = s * tl.sum(tl.where(p > 0, p * (logp - logqk), 0.0), 0)

    g = tl.load(gs_ptr).to(ACC)
    gk = g * tl.load(kdw_ptr + row).to(ACC)
    gc = g * tl.load(cew_ptr + row).to(ACC)
    if NEED_GZ:
        # dD/dz_j = (s/T)(P q_j - p_j [j in top-k]); dCE/dz_j = softmax(z)_j - [j = y]
        cp = gk * s * iT
        cq = cp * Pm
        gz_row = gz_ptr + row * stride_gz
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb = offs < C
            x = _load_row(z_row, offs, offs < lim, ACC)
            q = tl.exp((x * iT - mas) - la)
            gz = cq * q
            if HAS_CE:
                if CE_SHARED:
                    gz += gc * q
                else:
                    gz += gc * tl.exp((x - m1s) - l1)
            gz = _finish(gz, ignored, bad)
            tl.store(gz_row + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        tl.debug_barrier()   # the dense stores above before the rewrites of single columns below
        gzk = cq * tl.exp(logqk) - cp * p
        if HAS_CE:
            gzk += gc * tl.exp((zk - m1s) - l1)
            # the label column: its dense value, -g_ce, and the teacher's term if y is a top-k class
            py = tl.sum(tl.where(kmask & (ix == y), p, 0.0), 0)
            gy = cq * tl.exp((zy * iT - mas) - la) + gc * (tl.exp((zy - m1s) - l1) - 1.0) - cp * py
            tl.store(gz_row + y, gy.to(gz_ptr.dtype.element_ty), mask=live)
            kmask = kmask & (ix != y)   # written above: one store per address
        tl.store(gz_row + ix, gzk.to(gz_ptr.dtype.element_ty), mask=kmask)

    tl.store(d_ptr + row, _finish(D, ignored, bad))
    tl.store(ce_ptr + row, _finish(ce, ignored, bad))
