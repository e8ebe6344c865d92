"""The LM kind of the Triton kernel: logit matching, D = (1/2C) sum (d_j - dbar)^2, d = z - v
(centred or not). Its own two passes (the row means, then the loss and the gradients).

Two phases (kdfast/_spec.py, LMStat): ``lm_stats`` stores the local sums of z and of each teacher
row (float64) with CE's lse pair and the label logit; phase 2 combines them (``lm_combine``: the
sums add, the pair as an lse) and runs pass 2 over the local columns with the global means; D is
itself a sum over the columns, so its term is ``b + X`` with b = a = 0 and X this rank's part.
"""
import triton
import triton.language as tl

from .common import (
    NEG_INF, _finish, _load_row, _load_teachers, _lse_rows, _safe, _tmask, _tsum, _two_diff)
from .kl import _comb_add, _comb_max, _comb_sum, _held_max

# the statistics layout of a row (kdfast._spec.LMStat, then one sum per teacher; float64)
LM_SUM_Z: tl.constexpr = tl.constexpr(0)
LM_M_ONE: tl.constexpr = tl.constexpr(1)
LM_S_ONE: tl.constexpr = tl.constexpr(2)
LM_Z_Y: tl.constexpr = tl.constexpr(3)
LM_COUNT: tl.constexpr = tl.constexpr(4)


@triton.jit
def _sum64(x, mask):
    """A tile's row sums in float64 (the lanes outside ``mask``: 0). Float32 / 16-bit logits are
    exact in float64 and so is their sum while it spans < 53 bits (a row's 24-bit values within 2^29
    of each other's scale); float64 logits round as any double sum."""
    return tl.sum(tl.where(mask, x, 0.0).to(tl.float64), 1)


@triton.jit
def lm_stats(
        st_ptr, row, M, tm, tok, tok2, z_row, v_rows, zp_row, cols, C, rho, omr, yl, here, lim,
        m_1, s_1, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_ZP: tl.constexpr,
        CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr,
):
    """Phase 1: one sweep over this rank's columns: the sums of z and of each teacher row as the
    loss sees it (center; else 0, as the C++ kernel stores), CE's lse pair of z (0, 0 without CE)
    and the label logit where this rank holds it (else 0), into the LMStat layout."""
    base = st_ptr + row * (LM_COUNT + M)
    o1 = tl.zeros([1], tl.int64)
    sz = o1.to(tl.float64)
    sv = (tm * 0).to(tl.float64)
    if CENTER or HAS_CE:
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            if CENTER:
                tmask = _tmask(mask, tok2, MB)
                v = _load_teachers(v_rows, zp_row, offs, tmask, mask, rho, omr, HAS_ZP, ACC)
                sz += _sum64(z, mask)
                sv += _sum64(v, tmask)
            if HAS_CE:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
    tl.store(base + o1 + LM_SUM_Z, sz)
    if HAS_CE:
        tl.store(base + o1 + LM_M_ONE, _held_max(_safe(m_1), s_1))
        tl.store(base + o1 + LM_S_ONE, s_1.to(tl.float64))
    else:
        tl.store(base + o1 + LM_M_ONE, o1.to(tl.float64))
        tl.store(base + o1 + LM_S_ONE, o1.to(tl.float64))
    zy = tl.sum(o1.to(tl.float64), 0)
    if HAS_LABELS:
        zy = tl.load(z_row + yl, mask=here, other=0.0).to(ACC).to(tl.float64)
    tl.store(base + LM_Z_Y, zy)
    tl.store(base + LM_COUNT + tm, sv, mask=tok)


@triton.jit
def lm_combine(st_ptr, row, M, tm, world, live, lim_m, K, HAS_LABELS: tl.constexpr,
               HAS_CE: tl.constexpr):
    """Phase 2: (sum z, sum v per teacher, CE's (m_1, s_1), z_y) over every rank (float64; the
    sums and the label logit add, the pair combines as an lse: kdfast/_spec.py, "Combine");
    ``K`` the row stride of ``gstats`` (LMStat's columns first: LS's later rounds after them)."""
    rs = tl.num_programs(0).to(tl.int64) * K
    base = st_ptr + row * K
    o1 = tl.zeros([1], tl.int64)
    m1 = o1 < tl.where(live, 1, 0)
    sz = _comb_add(base, rs, world, o1 + LM_SUM_Z, m1)
    sv = _comb_add(base, rs, world, tm + LM_COUNT, tm < lim_m)
    mo = (o1 * 0).to(tl.float64) + NEG_INF
    so = o1.to(tl.float64)
    if HAS_CE:
        mo = _comb_max(base, rs, world, o1 + LM_M_ONE, o1 + LM_S_ONE, m1)
        so = _comb_sum(base, rs, world, o1 + LM_M_ONE, o1 + LM_S_ONE, m1, mo)
    zy = o1.to(tl.float64)
    if HAS_LABELS:
        zy = _comb_add(base, rs, world, o1 + LM_Z_Y, m1)
    return sz, sv, mo, so, zy


@triton.jit
def lm_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, rho, omr, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt, m_1,
        s_1, D, ce, HAS_CE: tl.constexpr, CE_SHARED: tl.constexpr, HAS_ZP: tl.constexpr,
        CENTER: tl.constexpr, NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, MB: tl.constexpr, PHASE: tl.constexpr, HAS_LABELS: tl.constexpr,
        st_ptr, M, world, vocab, here,
):
    """LM kind: returns (D per teacher, CE, a, X); writes the gradients. Phase 1: ``lm_stats``
    only. Phase 2: the means from every rank's sums (C the vocabulary), the term ``b + X`` with
    b = a = 0 and X this rank's part of sum e^2 / 2C; CE one-pass as fused (always b)."""
    coef = zt
    xs = zt
    if PHASE == 1:
        lm_stats(st_ptr, row, M, tm, tok, tok2, z_row, v_rows, zp_row, cols, C, rho, omr, y, here,
                 lim, m_1, s_1, HAS_LABELS, HAS_CE, HAS_ZP, CENTER, ACC, BLOCK, MB)
    else:
        D, ce, xs = _lm_pass2(gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base,
            v_rows, zp_row, gv_rows, cols, rho, omr, Cf, y, ignored, bad, live, lim, lim_m, gk, gc,
            zs, zt, m_1, s_1, D, ce, HAS_CE, HAS_ZP, CENTER, NEED_GZ, NEED_GV, ACC, BLOCK, MB,
            PHASE, HAS_LABELS, st_ptr, M, world, vocab)
    return D, ce, coef, xs


@triton.jit
def _lm_pass2(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, rho, omr, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt, m_1,
        s_1, D, ce, HAS_CE: tl.constexpr, HAS_ZP: tl.constexpr, CENTER: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr, PHASE: tl.constexpr, HAS_LABELS: tl.constexpr, st_ptr, M, world, vocab,
):
    """The fused kernel's LM passes (``PHASE`` 0), or phase 2's from the combined statistics:
    (D, CE, this rank's X)."""
    xs = zt
    # e_j = (z_j - zbar) - (v_j - vbar) (center) or z_j - v_j. Centred on the row's first column:
    # t_j = (z_j - v_j) - (z_0 - v_0), e_j = t_j - mean(t), with z_j - v_j as an exact float
    # pair (s_j + r_j, ``_two_diff``): t_j = (s_j - s_0) + (r_j - r_0) is accurate to its own
    # size whether the rows sit at an offset from each other (z_j - v_j rounded first would
    # round at the offset) or each at its own (z_j - z_0 first would round at the spread);
    # mean(t) is the mean of the very t_j used: sum e = 0 to rounding.
    tsum = zt
    z0 = zs
    v0 = zt
    if PHASE == 2:
        # the whole row's: C = vocab, the means from the ranks' exact sums, CE's pair and z_y
        sz, sv, mo, so, zy = lm_combine(st_ptr, row, M, tm, world, live, lim_m, LM_COUNT + M,
                                        HAS_LABELS, HAS_CE)
        cg = tl.zeros([1], tl.float64) + vocab
        Cf = cg.to(ACC)
        m_1 = mo.to(ACC)
        s_1 = so.to(ACC)
        zbar = sz / cg
        vbar = sv / cg
        zb = zbar.to(ACC)
        vb = vbar.to(ACC)
        # u_j = (z_j - zbar) - (v_j - vbar) = ((z_j - zb) - (v_j - vb)) + fix with zb, vb the means
        # rounded to ACC and fix = (zb - zbar) - (vb - vbar) what that rounding took off (a
        # constant shift of u would survive in the gradient, whose exact row sum is 0)
        fix = ((zb.to(tl.float64) - zbar) - (vb.to(tl.float64) - vbar)).to(ACC)
    elif CENTER:
        i0 = zs.to(tl.int32)   # (1,) zeros: the first column
        z0 = tl.load(z_row + i0, mask=i0 < lim, other=0.0).to(ACC)
        v0 = _load_teachers(v_base, zp_row, 0, tm < lim_m, live, rho, omr, HAS_ZP, ACC)
        v0 = tl.where(tok & live, v0, 0.0)
    s0, r0 = _two_diff(z0, v0)
    if PHASE == 0 and (CENTER or HAS_CE):
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            if CENTER:
                v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr,
                                   HAS_ZP, ACC)
                sd, rd = _two_diff(z, v)
                tsum += tl.sum(tl.where(mask, (sd - s0[:, None]) + (rd - r0[:, None]), 0.0), 1)
            if HAS_CE:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
    tbar = tsum / Cf
    sq = zt
    # Pass 2: D = (1/2C) sum e_j^2 (two-pass form, no cancellation);
    # dD/dz_j = e_j/C, dD/dv_j = -e_j/C (times (1 - rho) for retro).
    # Multi: dL/dz_j = sum_m kd_w[m] e_mj/C; dL/dv_mj = -kd_w[m] e_mj/C.
    m1s = _safe(m_1)
    l1 = tl.log(s_1)
    if HAS_CE:
        # CE = lse(z) - z_y = (m1 - z_y) + l1 (max and log-sum apart: no rounding of lse as one
        # float), read before the sweep below overwrites z when grad_z aliases it (phase 2: z_y
        # from the statistics)
        if PHASE == 2:
            ce = (m1s - zy.to(ACC)) + l1
        else:
            ce = (m1s - tl.load(z_row + y, mask=live, other=0.0).to(ACC)) + l1
    for start in range(0, C, BLOCK):
        offs = start + cols
        inb = offs < C
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP, ACC)
        if CENTER and PHASE == 2:
            e = tl.where(mask, ((z - zb[:, None]) - (v - vb[:, None])) + fix[:, None], 0.0)
        elif CENTER:
            sd, rd = _two_diff(z, v)
            e = tl.where(mask, ((sd - s0[:, None]) + (rd - r0[:, None])) - tbar[:, None], 0.0)
        else:
            e = tl.where(mask, z - v, 0.0)
        sq += tl.sum(e * e, 1)
        if NEED_GZ:
            gz = _tsum((gk / Cf)[:, None] * e, tok2, MB)
            if HAS_CE:
                # dCE/dz_j = softmax(z)_j - [j = y], softmax(z)_j = exp((z_j - m1) - l1)
                gz += gc * (tl.exp((z - m1s[:, None]) - l1[:, None]) - (offs == y).to(ACC))
            gz = _finish(gz, ignored, bad)
            tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        if NEED_GV:
            gv = (-gk / Cf)[:, None] * e
            if HAS_ZP:
                gv = gv * omr
            gv = _finish(gv, ignored, bad)
            tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty), mask=_tmask(inb, tok2, MB))
    if PHASE == 2:   # D = sum_j e_j^2 / 2C adds over the ranks: b = a = 0, X this rank's part
        xs = sq / (2.0 * Cf)
    else:
        D = sq / (2.0 * Cf)

    return D, ce, xs
