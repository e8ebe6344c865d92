"""The LS kind of the Triton kernel: logit standardisation (KD at T on the standardised rows).
Its own three passes (means and M2, the KL statistics, then the loss and the gradients).
"""
import triton
import triton.language as tl

from .common import (
    NEG_INF, _finish, _load_row, _load_teachers, _log1p, _lse_rows, _phi_term, _ref, _safe,
    _tmask, _tsum, _upd_ref, _x_plan)


@triton.jit
def ls_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, ts, rho, omr, its, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt,
        m_a, s_a, m_c, s_c, w, a_ref, m_1, s_1, D, ce, HAS_CE: tl.constexpr, HAS_ZP: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr,
):
    """LS kind: returns (D per teacher, CE); writes the gradients."""
    # ---- pass 1: mean and M2 of z and of each v_m, Chan's block-wise combination (no
    # cancellation); the student's once, each teacher's in its slot. Of the deviations from
    # the row's first element (z0, v0: exact for a row at an offset), so that a mean rounded
    # at the offset's scale neither shifts u = z - zbar nor inflates M2 (a row of two values
    # one ulp apart: sigma off by sqrt(2)); mz, mv are the deviations' means ----
    i0 = zs.to(tl.int32)   # (1,) zeros: the first column
    z0 = tl.load(z_row + i0, mask=i0 < lim, other=0.0).to(ACC)
    v0 = _load_teachers(v_base, zp_row, 0, tm < lim_m, live, rho, omr, HAS_ZP, ACC)
    v0 = tl.where(tok & live, v0, 0.0)
    n = zs
    mz = zs
    Mz = zs
    mv = zt
    Mv = zt
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP, ACC)
        if HAS_CE:
            m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
        z = z - z0[:, None]
        v = v - v0[:, None]
        nb = tl.sum(mask.to(ACC), 1)
        nn = n + nb
        inb_ = nb / tl.maximum(nn, 1.0)
        ib = 1.0 / tl.maximum(nb, 1.0)
        bz = tl.sum(tl.where(mask, z, 0.0), 1) * ib
        dz = tl.where(mask, z - bz[:, None], 0.0)
        delta_z = bz - mz
        mz += delta_z * inb_
        Mz += tl.sum(dz * dz, 1) + delta_z * delta_z * n * inb_
        bv = tl.sum(tl.where(mask, v, 0.0), 1) * ib
        dv = tl.where(mask, v - bv[:, None], 0.0)
        delta_v = bv - mv
        mv += delta_v * inb_
        Mv += tl.sum(dv * dv, 1) + delta_v * delta_v * n * inb_
        n = nn
    sig_z = tl.sqrt(Mz / (Cf - 1.0))
    sig_v = tl.sqrt(Mv / (Cf - 1.0))
    kz = 1e-7 + sig_z
    kv = 1e-7 + sig_v
    ikz = 1.0 / kz
    ikv = 1.0 / kv
    # ---- pass 2: KL statistics on z' = (z - zbar)/kz, v' likewise, at T = ts, plus the sums
    # for the chain through mean and s: sum e_a u, sum e_c u (student), sum e_c d u^v,
    # sum e_c u^v (teacher), d_j = (c_j - m_c) - (a_j - m_a) relative to the running maxima as
    # W's (docs/kernel-math.md, KL kind; corrected like W when they move). sum e_a u once; the
    # others per teacher.
    qu = zs
    pu = zt
    pwu = zt
    pvu = zt
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP, ACC)
        uz = tl.where(mask, (z - z0[:, None]) - mz[:, None], 0.0)
        uv = tl.where(mask, (v - v0[:, None]) - mv[:, None], 0.0)
        a = tl.where(mask, uz * (ikz * its)[:, None], NEG_INF)
        c = tl.where(mask, uv * (ikv * its)[:, None], NEG_INF)
        s_c0 = s_c
        mcs0 = _safe(m_c)
        ar0 = _ref(a_ref, _safe(m_a))
        bmc = tl.max(c, 1)
        a_ref = _upd_ref(a_ref, bmc, m_c, tl.max(tl.where(c == bmc[:, None], a, NEG_INF), 1))
        m_a, s_a, r_a, e_a = _lse_rows(m_a, s_a, a)
        m_c, s_c, r_c, e_c = _lse_rows(m_c, s_c, c)
        mcs = _safe(m_c)
        ar = _ref(a_ref, _safe(m_a))
        # d_j = (c_j - m_c) - (a_j - a_ref) (KL kind below: 0 at the teacher's argmax) shifts by
        # -((mc' - mc) - (ar' - ar)) when the max or the reference moves (0 before any mass)
        shift = tl.where(s_c0 > 0.0, (mcs - mcs0) - (ar - ar0), 0.0)
        dd = tl.where(mask, (c - mcs[:, None]) - (a - ar[:, None]), 0.0)
        w = r_c * (w - s_c0 * shift) + tl.sum(e_c * dd, 1)
        if NEED_GZ:
            qu = qu * r_a + tl.sum(e_a * uz, 1)
            pu = pu * r_c + tl.sum(e_c * uz, 1)
        if NEED_GV:
            pwu = r_c * (pwu - pvu * shift) + tl.sum(e_c * dd * uv, 1)
            pvu = pvu * r_c + tl.sum(e_c * uv, 1)
    mas = _safe(m_a)
    mcs = _safe(m_c)
    la = tl.log(s_a)
    lc = tl.log(s_c)
    ar = _ref(a_ref, mas)
    dbar = w / s_c
    kl1 = (dbar + (mas - ar)) - (lc - la)
    m1s = _safe(m_1)
    l1 = tl.log(s_1)
    if HAS_CE:
        ce = (m1s - tl.load(z_row + y, mask=live, other=0.0).to(ACC)) + l1
    # gamma_j = dD/dz'_j = T (q_j - p_j);  sum_k gamma_k u_k = T (sum q u - sum p u)
    sgu_z = ts * (qu / s_a - pu / s_c)
    # gamma^v_j = T p_j u_j, u_j = d_j - dbar (= log p_j - log q_j - KL):
    # sum_k gamma^v_k u^v_k = T (sum p d u^v - dbar sum p u^v)
    sgu_v = ts * (pwu / s_c - dbar * (pvu / s_c))
    # ---- pass 3: dD/dz_j = gamma_j / k - (sum gamma u) u_j / (k^2 (C-1) sigma), and X (the
    # accurate loss, when ``_x_plan`` asks for it; forward-only calls sweep only then)
    # Multi: dL/dz_j = sum_m kd_w[m] (gamma_mj / k - (sum gamma_m u) u_j / (k^2 (C-1) sigma)):
    # k, sigma, u of the student shared, gamma_m and its sum per teacher.
    # (a constant row, sigma = 0: u = 0 there, so the term is 0, not 0 / 0)
    cz = tl.where(sig_z > 0.0, sgu_z / (kz * kz * (Cf - 1.0) * sig_z), 0.0)
    cv = tl.where(sig_v > 0.0, sgu_v / (kv * kv * (Cf - 1.0) * sig_v), 0.0)
    use_x, ex, c_end = _x_plan(kl1, tl.abs(dbar) + tl.abs(mas - ar), la, lc, tok, C, NEED_GZ,
                               NEED_GV)
    xs = zt
    for start in range(0, c_end, BLOCK):
        offs = start + cols
        inb = offs < C
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP,
                           ACC)
        uz = tl.where(mask, (z - z0[:, None]) - mz[:, None], 0.0)
        uv = tl.where(mask, (v - v0[:, None]) - mv[:, None], 0.0)
        a = uz * (ikz * its)[:, None]
        da = a - mas[:, None]
        dc = uv * (ikv * its)[:, None] - mcs[:, None]
        q = tl.where(mask, tl.exp(da - la[:, None]), 0.0)
        p = tl.where(mask, tl.exp(dc - lc[:, None]), 0.0)
        u = (dc - (a - ar[:, None])) - dbar[:, None]
        xs += tl.sum(_phi_term(p, u, q * ex[:, None], ACC), 1)
        if NEED_GZ:
            gam = ts * (q - p)
            gz = _tsum(gk[:, None] * (gam * ikz[:, None] - cz[:, None] * uz), tok2, MB)
            if HAS_CE:
                gz += gc * (tl.exp((z - m1s[:, None]) - l1[:, None]) - (offs == y).to(ACC))
            gz = _finish(gz, ignored, bad)
            tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        if NEED_GV:
            gam_v = ts * tl.where(p > 0.0, p * u, 0.0)
            gv = gk[:, None] * (gam_v * ikv[:, None] - cv[:, None] * uv)
            if HAS_ZP:
                gv = gv * omr
            gv = _finish(gv, ignored, bad)
            tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                     mask=_tmask(inb, tok2, MB))
    D = ts * ts * tl.where(use_x, _log1p(xs), kl1)

    return D, ce
