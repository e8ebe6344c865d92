"""The LM kind of the Triton kernel: logit matching, D = (1/2C) sum (d_j - dbar)^2, d = z - v
(centred or not). Its own two passes (the row means, then the loss and the gradients).
"""
import triton
import triton.language as tl

from .common import _finish, _load_row, _load_teachers, _lse_rows, _safe, _tmask, _tsum, _two_diff


@triton.jit
def lm_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, rho, omr, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt, m_1,
        s_1, D, ce, HAS_CE: tl.constexpr, CE_SHARED: tl.constexpr, HAS_ZP: tl.constexpr,
        CENTER: tl.constexpr, NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, MB: tl.constexpr,
):
    """LM kind: returns (D per teacher, CE); writes the gradients."""
    # e_j = (z_j - zbar) - (v_j - vbar) (center) or z_j - v_j. Centred on the row's first column:
    # t_j = (z_j - v_j) - (z_0 - v_0), e_j = t_j - mean(t), with z_j - v_j as an exact float
    # pair (s_j + r_j, ``_two_diff``): t_j = (s_j - s_0) + (r_j - r_0) is accurate to its own
    # size whether the rows sit at an offset from each other (z_j - v_j rounded first would
    # round at the offset) or each at its own (z_j - z_0 first would round at the spread);
    # mean(t) is the mean of the very t_j used: sum e = 0 to rounding.
    tsum = zt
    z0 = zs
    v0 = zt
    if CENTER:
        i0 = zs.to(tl.int32)   # (1,) zeros: the first column
        z0 = tl.load(z_row + i0, mask=i0 < lim, other=0.0).to(ACC)
        v0 = _load_teachers(v_base, zp_row, 0, tm < lim_m, live, rho, omr, HAS_ZP, ACC)
        v0 = tl.where(tok & live, v0, 0.0)
    s0, r0 = _two_diff(z0, v0)
    if CENTER or (HAS_CE and not CE_SHARED):
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
        # float), read before the sweep below overwrites z when grad_z aliases it
        ce = (m1s - tl.load(z_row + y, mask=live, other=0.0).to(ACC)) + l1
    for start in range(0, C, BLOCK):
        offs = start + cols
        inb = offs < C
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP, ACC)
        if CENTER:
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
    D = sq / (2.0 * Cf)

    return D, ce
