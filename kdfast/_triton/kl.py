"""The KL kind of the Triton kernel: kd, ttm, wttm, retro_kd and jsd at beta in {0, 1} (forward and
reverse KL). Pass 2 (after ``common.softmax_stats``): the loss (one-pass KL1, or log1p of X
accumulated in the gradient sweep) and the gradients.

The two phases of tensor parallelism (kdfast/_spec.py, "Two phases"): ``kl_stats`` stores a row's
pass-1 statistics over this rank's columns (phase 1), ``kl_combine`` merges the ranks' (phase 2),
after which ``kl_kind`` runs over the local columns as in the fused kernel.
"""
import triton
import triton.language as tl

from .common import (
    NEG_INF, _finish, _load_row, _load_teachers, _log1p, _phi_term, _ref, _safe, _tmask, _tsum,
    _x_plan)

# the statistics layout of a row (kdfast._spec.KLStat, then KLTeacherStat per teacher; float64)
ST_M_Z: tl.constexpr = tl.constexpr(0)
ST_S_Z: tl.constexpr = tl.constexpr(1)
ST_M_ONE: tl.constexpr = tl.constexpr(2)
ST_S_ONE: tl.constexpr = tl.constexpr(3)
ST_Z_Y: tl.constexpr = tl.constexpr(4)
ST_COUNT: tl.constexpr = tl.constexpr(5)
STT_M_V: tl.constexpr = tl.constexpr(0)
STT_S_V: tl.constexpr = tl.constexpr(1)
STT_R: tl.constexpr = tl.constexpr(2)
STT_W: tl.constexpr = tl.constexpr(3)
STT_M_U: tl.constexpr = tl.constexpr(4)
STT_S_U: tl.constexpr = tl.constexpr(5)
STT_V_Y: tl.constexpr = tl.constexpr(6)
STT_COUNT: tl.constexpr = tl.constexpr(7)


@triton.jit
def _held_max(m, s):
    """A stream's max as stored: -inf where it has no mass here (s = 0), in float64."""
    return tl.where(s > 0.0, m, NEG_INF).to(tl.float64)


@triton.jit
def kl_stats(
        st_ptr, row, M, tm, tok, z_row, v_base, zp_row, yl, here, rho, omr, mas, mcs, s_a, s_c, w,
        a_ref, c_ref, m_u, s_u, m_1, s_1, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, WTTM: tl.constexpr, REVERSE: tl.constexpr,
        HAS_ZP: tl.constexpr, ACC: tl.constexpr, LSE_ONLY: tl.constexpr = False,
):
    """Phase 1: the row's pass-1 statistics over this rank's columns into its ``stats`` row (the
    KLStat / KLTeacherStat layout, float64; values of the accumulation dtype, exact in float64).
    ``W`` is stored with the reference it was taken against (``_ref``: the other stream's value at
    the weighting stream's argmax, a = z / Ts for the forward KL, c = v / Tt for the reverse);
    ``yl`` the label's local column, ``here`` whether this rank holds it. ``LSE_ONLY`` (JSD's round
    0): only the lse pairs and z_y; R, W and v_y are 0 (as the C++ kernel stores them)."""
    base = st_ptr + row * (ST_COUNT + M * STT_COUNT)
    o1 = tl.zeros([1], tl.int64)
    tl.store(base + o1 + ST_M_Z, _held_max(mas, s_a))
    tl.store(base + o1 + ST_S_Z, s_a.to(tl.float64))
    if HAS_CE:
        if CE_SHARED:   # CE's lse is the student's at Ts = 1: a copy of its pair
            m1 = mas
            s1 = s_a
        else:
            m1 = _safe(m_1)
            s1 = s_1
        tl.store(base + o1 + ST_M_ONE, _held_max(m1, s1))
        tl.store(base + o1 + ST_S_ONE, s1.to(tl.float64))
    else:
        tl.store(base + o1 + ST_M_ONE, o1.to(tl.float64))
        tl.store(base + o1 + ST_S_ONE, o1.to(tl.float64))
    zy = tl.sum(o1.to(tl.float64), 0)
    if HAS_LABELS:
        zy = tl.load(z_row + yl, mask=here, other=0.0).to(ACC).to(tl.float64)
    tl.store(base + ST_Z_Y, zy)
    tb = base + ST_COUNT + tm * STT_COUNT   # (MB,): teacher m's block
    tl.store(tb + STT_M_V, _held_max(mcs, s_c), mask=tok)
    tl.store(tb + STT_S_V, s_c.to(tl.float64), mask=tok)
    if REVERSE:   # W = sum q_j d_j, d_j = (a_j - m_a) - (c_j - R)
        ref = _ref(c_ref, mcs)
    else:         # W = sum p_j d_j, d_j = (c_j - m_c) - (a_j - R)
        ref = _ref(a_ref, mas)
    if LSE_ONLY:
        ref = ref * 0.0
        w = w * 0.0
    tl.store(tb + STT_R, ref.to(tl.float64), mask=tok)
    tl.store(tb + STT_W, w.to(tl.float64), mask=tok)
    if WTTM:
        tl.store(tb + STT_M_U, _held_max(_safe(m_u), s_u), mask=tok)
        tl.store(tb + STT_S_U, s_u.to(tl.float64), mask=tok)
    else:
        tl.store(tb + STT_M_U, (tm * 0).to(tl.float64), mask=tok)
        tl.store(tb + STT_S_U, (tm * 0).to(tl.float64), mask=tok)
    # the label logit of each teacher row the loss sees (r = (1 - rho) v + rho zp for retro_kd) at
    # temperature 1, as z_y
    vy = (tm * 0).to(ACC)
    if HAS_LABELS and not LSE_ONLY:
        vy = _load_teachers(v_base, zp_row, yl, tm < tl.where(here, M, 0), here, rho, omr, HAS_ZP,
                            ACC)
        vy = tl.where(here, vy, 0.0)
    tl.store(tb + STT_V_Y, vy.to(tl.float64), mask=tok)


@triton.jit
def _comb_max(base, rs, world, om, os, mask):
    """M = max over the ranks with mass (S_r > 0) of M_r (-inf when none has any); ``base`` the
    row's statistics on rank 0, ``rs`` the rank stride, ``om`` / ``os`` the pair's columns."""
    m = (om * 0).to(tl.float64) + NEG_INF
    for r in range(0, world):
        mr = tl.load(base + r * rs + om, mask=mask, other=NEG_INF)
        sr = tl.load(base + r * rs + os, mask=mask, other=0.0)
        m = tl.where(sr > 0.0, tl.maximum(m, mr), m)
    return m


@triton.jit
def _comb_sum(base, rs, world, om, os, mask, m):
    """S = sum_r S_r e^(M_r - M) over the ranks with S_r > 0 (the online lse's rescale)."""
    ms = _safe(m)
    s = (om * 0).to(tl.float64)
    for r in range(0, world):
        mr = tl.load(base + r * rs + om, mask=mask, other=NEG_INF)
        sr = tl.load(base + r * rs + os, mask=mask, other=0.0)
        ok = sr > 0.0
        s += tl.where(ok, sr * tl.exp(tl.where(ok, mr - ms, 0.0)), 0.0)
    return s


@triton.jit
def _comb_add(base, rs, world, o, mask):
    """sum_r x_r of a column that adds over the ranks (sums of logits, label logits: one rank holds
    the label's, the others stored 0), in float64."""
    x = (o * 0).to(tl.float64)
    for r in range(0, world):
        x += tl.load(base + r * rs + o, mask=mask, other=0.0)
    return x


@triton.jit
def _comb_w(base, rs, world, om, os, mask_w, m, o_r, o_w, mask):
    """(R, W) of the KL statistic: R from the first rank holding the weighting stream's max (M_r = M,
    S_r > 0); d^r_j = d_j + (M - M_r) - (R - R_r) against rank r's (M_r, R_r), so
    W = sum_r e^(M_r - M) (W_r - S_r ((M - M_r) - (R - R_r))) over the ranks with S_r > 0. ``om``,
    ``os``, ``mask_w``, ``m``: the weighting stream (the teacher's, the student's for the reverse
    KL), ``o_r``, ``o_w``, ``mask``: R and W per teacher."""
    ms = _safe(m)
    ref = (o_r * 0).to(tl.float64)
    for i in range(0, world):   # last to first: the first such rank's R is assigned last
        r = world - 1 - i
        mr = tl.load(base + r * rs + om, mask=mask_w, other=NEG_INF)
        sr = tl.load(base + r * rs + os, mask=mask_w, other=0.0)
        rr = tl.load(base + r * rs + o_r, mask=mask, other=0.0)
        ref = tl.where((sr > 0.0) & (mr == m), rr, ref)
    return ref, _comb_shift(base, rs, world, om, os, mask_w, m, os, o_r, o_w, mask, ref)


@triton.jit
def _comb_shift(base, rs, world, om, os, mask_w, m, o_mass, o_r, o_w, mask, ref):
    """A statistic kept like W (``o_w``: sum_j e^(x_j - M_r) d_j x'_j against rank r's (M_r, R_r),
    ``o_mass`` its sum without d: S for W itself, LS's PUV for its PCU) over the ranks:
    sum_r e^(M_r - M) (W_r - mass_r ((M - M_r) - (R - R_r))) over the ranks with S_r > 0."""
    ms = _safe(m)
    w = (o_r * 0).to(tl.float64)
    for r in range(0, world):
        mr = tl.load(base + r * rs + om, mask=mask_w, other=NEG_INF)
        sr = tl.load(base + r * rs + os, mask=mask_w, other=0.0)
        xr = tl.load(base + r * rs + o_mass, mask=mask_w, other=0.0)
        rr = tl.load(base + r * rs + o_r, mask=mask, other=0.0)
        wr = tl.load(base + r * rs + o_w, mask=mask, other=0.0)
        ok = sr > 0.0
        e = tl.exp(tl.where(ok, mr - ms, 0.0))
        sh = tl.where(ok, (ms - mr) - (ref - rr), 0.0)
        w += tl.where(ok, e * (wr - xr * sh), 0.0)
    return w


@triton.jit
def _comb_rescaled(base, rs, world, om, os, o_x, mask, m):
    """A sum kept at the scale of its stream's max (sum_j e^(x_j - M_r) y_j) over the ranks:
    sum_r e^(M_r - M) X_r over the ranks with S_r > 0."""
    ms = _safe(m)
    x = (o_x * 0).to(tl.float64)
    for r in range(0, world):
        mr = tl.load(base + r * rs + om, mask=mask, other=NEG_INF)
        sr = tl.load(base + r * rs + os, mask=mask, other=0.0)
        xr = tl.load(base + r * rs + o_x, mask=mask, other=0.0)
        ok = sr > 0.0
        x += tl.where(ok, tl.exp(tl.where(ok, mr - ms, 0.0)) * xr, 0.0)
    return x


@triton.jit
def kl_combine(
        st_ptr, row, M, tm, world, live, lim_m, K, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, WTTM: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
):
    """Phase 2: the row's statistics over all ranks from ``gstats`` (world, N, K), in float64 (the
    formulas of kdfast/_spec.py, "Combine"), then rounded to ACC: (m_a, s_a, m_c, s_c, W, R, m_u,
    s_u, m_1, s_1, z_y, v_y), each with the shape ``softmax_stats`` gives it ((1,) student, (MB,) per
    teacher; the pairs' maxima -inf without mass, as pass 1 leaves them). Ignored / bad rows read
    nothing (their outputs are overwritten). ``v_y``: the teachers' label logits (DKD). ``K``: the
    row stride of ``gstats`` (KLStat's columns first; JSD's later round after them)."""
    rs = tl.num_programs(0).to(tl.int64) * K   # rank stride: N rows of K
    base = st_ptr + row * K
    o1 = tl.zeros([1], tl.int64)
    m1 = o1 < tl.where(live, 1, 0)
    ot = ST_COUNT + tm * STT_COUNT
    mt = tm < lim_m
    mz = _comb_max(base, rs, world, o1 + ST_M_Z, o1 + ST_S_Z, m1)
    sz = _comb_sum(base, rs, world, o1 + ST_M_Z, o1 + ST_S_Z, m1, mz)
    mv = _comb_max(base, rs, world, ot + STT_M_V, ot + STT_S_V, mt)
    sv = _comb_sum(base, rs, world, ot + STT_M_V, ot + STT_S_V, mt, mv)
    if REVERSE:
        ref, w = _comb_w(base, rs, world, o1 + ST_M_Z, o1 + ST_S_Z, m1, mz, ot + STT_R,
                         ot + STT_W, mt)
    else:
        ref, w = _comb_w(base, rs, world, ot + STT_M_V, ot + STT_S_V, mt, mv, ot + STT_R,
                         ot + STT_W, mt)
    m_1 = mz
    s_1 = sz
    if HAS_CE and not CE_SHARED:
        m_1 = _comb_max(base, rs, world, o1 + ST_M_ONE, o1 + ST_S_ONE, m1)
        s_1 = _comb_sum(base, rs, world, o1 + ST_M_ONE, o1 + ST_S_ONE, m1, m_1)
    m_u = mv
    s_u = sv
    if WTTM:
        m_u = _comb_max(base, rs, world, ot + STT_M_U, ot + STT_S_U, mt)
        s_u = _comb_sum(base, rs, world, ot + STT_M_U, ot + STT_S_U, mt, m_u)
    zy = tl.sum(o1.to(tl.float64), 0)
    vy = (tm * 0).to(tl.float64)
    if HAS_LABELS:   # one rank holds the label's column, the others stored 0: the sums are exact
        for r in range(0, world):
            zy += tl.sum(tl.load(base + r * rs + o1 + ST_Z_Y, mask=m1, other=0.0), 0)
            vy += tl.load(base + r * rs + ot + STT_V_Y, mask=mt, other=0.0)
    return (mz.to(ACC), sz.to(ACC), mv.to(ACC), sv.to(ACC), w.to(ACC), ref.to(ACC), m_u.to(ACC),
            s_u.to(ACC), m_1.to(ACC), s_1.to(ACC), zy.to(ACC), vy.to(ACC))


@triton.jit
def kl_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tok, tok2, z_row, v_rows, zp_row, gv_rows, cols,
        scale, rho, omr, its, itt, y, ignored, bad, live, lim, gk, gc, zt, s_a, s_c, w, c_ref,
        a_ref, m_u, s_u, D, ce, mas, mcs, la, lc, m1s, l1, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, WTTM: tl.constexpr, REVERSE: tl.constexpr, HAS_ZP: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr, PHASE: tl.constexpr = 0, zy=0.0,
):
    """KL kind, after ``softmax_stats`` (phase 2: ``kl_combine``): returns (D per teacher, CE, a, X)
    and writes the gradients of the row's columns here. Fused (``PHASE`` 0): D the term, a and X
    unused. Phase 2: D is the term's ``b`` of ``b + a log1p(X)`` (kdfast/_spec.py), X this rank's
    part of the sum; ``zy`` the label's logit from the combined statistics."""
    # dbar = W / S_v = sum p d; KL1 = dbar + (m_a - a_ref) - (lc - la), d + (m_a - a_ref)
    # being the d against the maxima (reverse: W / S_a, dbar + (m_c - c_ref) - (la - lc))
    if REVERSE:
        cr = _ref(c_ref, mcs)
        dbar = w / s_a
        doff = mcs - cr
        kl1 = (dbar + doff) - (la - lc)
    else:
        ar = _ref(a_ref, mas)
        dbar = w / s_c
        doff = mas - ar
        kl1 = (dbar + doff) - (lc - la)
    if WTTM:
        # U = exp(lse(v/T) - lse(v)/T) = exp((m_c - m_u/T) + (lc - lu/T)), no gradient
        sf = tl.exp((mcs - _safe(m_u) * itt) + (lc - tl.log(s_u) * itt))
    else:
        sf = scale
    if HAS_CE:
        if PHASE == 2:   # z_y: the holding rank's, summed with the others' zeros (exact)
            ce = (m1s - zy) + l1
        else:
            ce = (m1s - tl.load(z_row + y, mask=live, other=0.0).to(ACC)) + l1
    # per teacher: kd_w[m] * s_m / Ts (s_m = U_m for wttm), and / Tt for the teacher
    cz = (gk * sf * its)[:, None]
    cv = (gk * sf * itt)[:, None]
    if HAS_ZP:
        cv = cv * omr
    use_x, ex, c_end = _x_plan(kl1, tl.abs(dbar) + tl.abs(doff), la, lc, tok, C, NEED_GZ,
                               NEED_GV)
    xs = zt
    for start in range(0, c_end, BLOCK):
        offs = start + cols
        inb = offs < C
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr,
                           HAS_ZP, ACC)
        a = z * its
        c = v * itt
        da = a - mas[:, None]
        dc = c - mcs[:, None]
        q = tl.exp(da - la[:, None])
        p = tl.exp(dc - lc[:, None])
        # u_j = d_j - dbar = log p_j - log q_j - KL (reverse: log q_j - log p_j - KL);
        # X = sum p phi(-u) (reverse: sum q phi(-u)), p_j e^{-u_j} = q_j e^KL
        if REVERSE:
            u = (da - (c - cr[:, None])) - dbar[:, None]
            xs += tl.sum(_phi_term(q, u, p * ex[:, None], ACC), 1)
        else:
            u = (dc - (a - ar[:, None])) - dbar[:, None]
            xs += tl.sum(_phi_term(p, u, q * ex[:, None], ACC), 1)
        if NEED_GZ:
            if REVERSE:
                # dD/dz_j = (s/Ts) q_j u_j;  multi: sum_m kd_w[m] (s/Ts) q_j u_mj
                gz = _tsum(cz * tl.where(q > 0.0, q * u, 0.0), tok2, MB)
            else:
                # dD/dz_j = (s/Ts) (q_j - p_j);  multi: sum_m kd_w[m] (s_m/Ts) (q_j - p_mj)
                gz = _tsum(cz * (q - p), tok2, MB)
            if HAS_CE:
                # dCE/dz_j = softmax(z)_j - [j = y]
                if CE_SHARED:
                    q1 = q
                else:
                    q1 = tl.exp((z - m1s[:, None]) - l1[:, None])
                gz += gc * (q1 - (offs == y).to(ACC))
            gz = _finish(gz, ignored, bad)
            tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        if NEED_GV:
            if REVERSE:
                # dD/dv_j = (s/Tt) (p_j - q_j)
                gv = cv * (p - q)
            else:
                # dD/dv_j = (s/Tt) p_j u_j, 0 where p_j = 0
                gv = cv * tl.where(p > 0.0, p * u, 0.0)
            gv = _finish(gv, ignored, bad)
            tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                     mask=_tmask(inb, tok2, MB))
    if PHASE == 2:
        # D = s log1p(X), X = sum over the ranks of each one's xs, or s KL1: b = 0, a = s or
        # b = s KL1, a = X = 0 (use_x from the global statistics: the same on every rank)
        coef = tl.where(use_x, sf, 0.0)
        D = tl.where(use_x, 0.0, sf * kl1)
        xs = tl.where(use_x, xs, 0.0)
    else:
        coef = zt
        D = sf * tl.where(use_x, _log1p(xs), kl1)

    return D, ce, coef, xs
