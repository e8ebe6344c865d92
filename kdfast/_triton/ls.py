"""The LS kind of the Triton kernel: logit standardisation (KD at T on the standardised rows).
Its own three passes (means and M2, the KL statistics, then the loss and the gradients).

Two phases (kdfast/_spec.py, LSStat: three rounds, the C++ kernel's layout): round 0 the sums of z
and of each teacher row, CE's pair and z_y (``logit_matching.lm_stats``: LMStat); round 1 the
centred sums of squares sum (z - zb)^2 (zb the global mean rounded to the accumulation dtype);
round 2 pass 2's statistics of a = u_z / (k_z T), c = u_v / (k_v T) (``_ls_pass2``); phase 2
combines them (``_comb_*``) and runs pass 3 over the local columns, the loss as
``b + a log1p(X)``. The fused pass 1 (Chan's update on the deviations from the first column) has no
rank-local form: the phases take the means from the exact sums instead, as the C++ kernel.
"""
import triton
import triton.language as tl

from .common import (
    NEG_INF, _finish, _load_row, _load_teachers, _log1p, _lse_rows, _phi_term, _ref, _safe,
    _tmask, _tsum, _upd_ref, _x_plan)
from .kl import _comb_add, _comb_max, _comb_rescaled, _comb_shift, _comb_sum, _comb_w, _held_max
from .logit_matching import LM_COUNT, lm_combine, lm_stats

# round 2's columns (kdfast._spec.LSStat, then LSTeacherStat per teacher)
LS_M_A: tl.constexpr = tl.constexpr(0)
LS_S_A: tl.constexpr = tl.constexpr(1)
LS_QU: tl.constexpr = tl.constexpr(2)
LS_COUNT: tl.constexpr = tl.constexpr(3)
LST_M_C: tl.constexpr = tl.constexpr(0)
LST_S_C: tl.constexpr = tl.constexpr(1)
LST_R: tl.constexpr = tl.constexpr(2)
LST_W: tl.constexpr = tl.constexpr(3)
LST_PU: tl.constexpr = tl.constexpr(4)
LST_PCU: tl.constexpr = tl.constexpr(5)
LST_PUV: tl.constexpr = tl.constexpr(6)
LST_COUNT: tl.constexpr = tl.constexpr(7)


@triton.jit
def _ls_pass2(
        C, tok2, z_row, v_rows, zp_row, cols, rho, omr, its, lim, z0, mz, v0, mv, ikz, ikv, zs, zt,
        m_a, s_a, m_c, s_c, w, a_ref, HAS_ZP: tl.constexpr, NEED_GZ: tl.constexpr,
        NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr,
):
    """Pass 2 (LS round 2 over the local columns): the KL statistics on z' = (z - zbar)/kz, v'
    likewise, at T = ts, plus the sums for the chain through mean and s: sum e_a u, sum e_c u
    (student: with NEED_GZ), sum e_c d u^v, sum e_c u^v (teacher: with NEED_GV), d_j = (c_j - m_c)
    - (a_j - a_ref) relative to the running maxima as W's (docs/kernel-math.md, KL kind;
    corrected like W when they move). sum e_a u once; the others per teacher. u = (z - z0) - mz
    (fused: the deviations from the first column and their mean; phases: z0 the mean, mz = 0).
    Returns (m_a, s_a, m_c, s_c, W, a_ref, Qu, Pu, PCu, PUv)."""
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
    return m_a, s_a, m_c, s_c, w, a_ref, qu, pu, pwu, pvu


@triton.jit
def ls_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, ts, rho, omr, its, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt,
        m_a, s_a, m_c, s_c, w, a_ref, m_1, s_1, D, ce, HAS_CE: tl.constexpr, HAS_ZP: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr, PHASE: tl.constexpr, ROUND: tl.constexpr, HAS_LABELS: tl.constexpr,
        st_ptr, part_ptr, M, world, vocab, here,
):
    """LS kind: returns (D per teacher, CE, a, X); writes the gradients. Phase 1: round 0
    ``lm_stats``; rounds 1 and 2 (from the combined earlier rounds in ``st_ptr``) into
    ``part_ptr``. Phase 2: the three rounds combined, then pass 3 (the loss as b + a log1p(X))."""
    coef = zt
    xs = zt
    if PHASE == 1 and ROUND == 0:
        lm_stats(st_ptr, row, M, tm, tok, tok2, z_row, v_rows, zp_row, cols, C, rho, omr, y, here,
                 lim, m_1, s_1, HAS_LABELS, HAS_CE, HAS_ZP, True, ACC, BLOCK, MB)
    else:
        D, ce, coef, xs = _ls_rest(gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row,
            v_base, v_rows, zp_row, gv_rows, cols, ts, rho, omr, its, Cf, y, ignored, bad, live,
            lim, lim_m, gk, gc, zs, zt, m_a, s_a, m_c, s_c, w, a_ref, m_1, s_1, D, ce, HAS_CE,
            HAS_ZP, NEED_GZ, NEED_GV, ACC, BLOCK, MB, PHASE, ROUND, HAS_LABELS, st_ptr, part_ptr,
            M, world, vocab)
    return D, ce, coef, xs


@triton.jit
def _ls_rest(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, ts, rho, omr, its, Cf, y, ignored, bad, live, lim, lim_m, gk, gc, zs, zt,
        m_a, s_a, m_c, s_c, w, a_ref, m_1, s_1, D, ce, HAS_CE: tl.constexpr, HAS_ZP: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr, PHASE: tl.constexpr, ROUND: tl.constexpr, HAS_LABELS: tl.constexpr,
        st_ptr, part_ptr, M, world, vocab,
):
    """The fused LS passes (``PHASE`` 0), phase 1's rounds 1 / 2, or phase 2: (D, CE, a, X)."""
    coef = zt
    xs = zt
    if PHASE != 0:
        # the combined rounds before this one (gstats' / gprev's row: round 0's LMStat columns,
        # then round 1's 1 + M, then round 2's), the whole row's C = vocab
        o1 = tl.zeros([1], tl.int64)
        k0 = M + LM_COUNT
        k1 = M + 1
        if PHASE == 2:
            K = k0 + k1 + (M * LST_COUNT + LS_COUNT)
        elif ROUND == 1:
            K = k0
        else:
            K = k0 + k1
        base = st_ptr + row * K
        rs = tl.num_programs(0).to(tl.int64) * K
        m1 = o1 < tl.where(live, 1, 0)
        mt = tm < lim_m
        sz, sv, mo, so, zy = lm_combine(st_ptr, row, M, tm, world, live, lim_m, K, HAS_LABELS,
                                        HAS_CE)
        m_1 = mo.to(ACC)
        s_1 = so.to(ACC)
        cg = tl.zeros([1], tl.float64) + vocab
        Cf = cg.to(ACC)
        # u = z - zb with zb the mean rounded to ACC (as the C++ kernel: the softmaxes do not see
        # a shift); fz = zb - zbar, what the rounding took off (z - zbar = (z - zb) + fz), added
        # back where a constant shift of u would survive: the sigma terms of the gradients
        zbar = sz / cg
        vbar = sv / cg
        z0 = zbar.to(ACC)
        v0 = vbar.to(ACC)
        fz = (z0.to(tl.float64) - zbar).to(ACC)
        fv = (v0.to(tl.float64) - vbar).to(ACC)
        mz = zs
        mv = zt
        if PHASE == 1 and ROUND == 1:
            # round 1: Q = sum_j (z_j - zb)^2 over the local columns (each teacher's likewise)
            qz = o1.to(tl.float64)
            qv = (tm * 0).to(tl.float64)
            for start in range(0, C, BLOCK):
                offs = start + cols
                mask = offs < lim
                tmask = _tmask(mask, tok2, MB)
                z = _load_row(z_row, offs, mask, ACC)
                v = _load_teachers(v_rows, zp_row, offs, tmask, mask, rho, omr, HAS_ZP, ACC)
                uz = tl.where(mask, z - z0[:, None], 0.0)
                uv = tl.where(tmask, v - v0[:, None], 0.0)
                qz += tl.sum(uz * uz, 1).to(tl.float64)
                qv += tl.sum(uv * uv, 1).to(tl.float64)
            ob = part_ptr + row * k1
            tl.store(ob + o1, qz)
            tl.store(ob + 1 + tm, qv, mask=tok)
            sig_z = zs
            sig_v = zt
        else:
            # sigma = sqrt(Q / (C - 1)) (unbiased), k = 1e-7 + sigma, in float64 from the ranks' Q
            qz = _comb_add(base, rs, world, o1 + k0, m1)
            qv = _comb_add(base, rs, world, tm + (k0 + 1), mt)
            sz64 = tl.sqrt(qz / (cg - 1.0))
            sv64 = tl.sqrt(qv / (cg - 1.0))
            sig_z = sz64.to(ACC)
            sig_v = sv64.to(ACC)
            kz = (1e-7 + sz64).to(ACC)
            kv = (1e-7 + sv64).to(ACC)
            ikz = (1.0 / (1e-7 + sz64)).to(ACC)
            ikv = (1.0 / (1e-7 + sv64)).to(ACC)
    else:
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
    if PHASE == 0 or ROUND == 2:
        # ---- pass 2 (round 2): the KL statistics of the standardised rows (``_ls_pass2``)
        m_a, s_a, m_c, s_c, w, a_ref, qu, pu, pwu, pvu = _ls_pass2(C, tok2, z_row, v_rows, zp_row,
            cols, rho, omr, its, lim, z0, mz, v0, mv, ikz, ikv, zs, zt, m_a, s_a, m_c, s_c, w,
            a_ref, HAS_ZP, NEED_GZ or PHASE == 1, NEED_GV or PHASE == 1, ACC, BLOCK, MB)
    if PHASE == 1 and ROUND == 2:
        # round 2's statistics (LSStat, LSTeacherStat): the pairs' maxima -inf without mass, R
        # the student's a at the teacher's argmax, the sums at the scale of their stream's max
        ob = part_ptr + row * (M * LST_COUNT + LS_COUNT)
        mas = _safe(m_a)
        tl.store(ob + o1 + LS_M_A, _held_max(mas, s_a))
        tl.store(ob + o1 + LS_S_A, s_a.to(tl.float64))
        tl.store(ob + o1 + LS_QU, qu.to(tl.float64))
        tb = ob + tm * LST_COUNT + LS_COUNT
        tl.store(tb + LST_M_C, _held_max(_safe(m_c), s_c), mask=tok)
        tl.store(tb + LST_S_C, s_c.to(tl.float64), mask=tok)
        tl.store(tb + LST_R, _ref(a_ref, mas).to(tl.float64), mask=tok)
        tl.store(tb + LST_W, w.to(tl.float64), mask=tok)
        tl.store(tb + LST_PU, pu.to(tl.float64), mask=tok)
        tl.store(tb + LST_PCU, pwu.to(tl.float64), mask=tok)
        tl.store(tb + LST_PUV, pvu.to(tl.float64), mask=tok)
    elif PHASE != 1:
        if PHASE == 2:
            # round 2 combined (kdfast/_spec.py, "Combine"; the C++ kernel's RankStats): the lse
            # pairs, R and W; Qu, Pu, PUv rescaled to the combined maxima; PCu shifted like W with
            # PUv as its mass
            o2 = o1 + k0 + k1
            ot = tm * LST_COUNT + (k0 + k1 + LS_COUNT)
            ma = _comb_max(base, rs, world, o2 + LS_M_A, o2 + LS_S_A, m1)
            sa = _comb_sum(base, rs, world, o2 + LS_M_A, o2 + LS_S_A, m1, ma)
            qu = _comb_rescaled(base, rs, world, o2 + LS_M_A, o2 + LS_S_A, o2 + LS_QU, m1, ma)
            mc = _comb_max(base, rs, world, ot + LST_M_C, ot + LST_S_C, mt)
            sc = _comb_sum(base, rs, world, ot + LST_M_C, ot + LST_S_C, mt, mc)
            ref, w = _comb_w(base, rs, world, ot + LST_M_C, ot + LST_S_C, mt, mc, ot + LST_R,
                             ot + LST_W, mt)
            pu = _comb_rescaled(base, rs, world, ot + LST_M_C, ot + LST_S_C, ot + LST_PU, mt, mc)
            pvu = _comb_rescaled(base, rs, world, ot + LST_M_C, ot + LST_S_C, ot + LST_PUV, mt,
                                 mc)
            pwu = _comb_shift(base, rs, world, ot + LST_M_C, ot + LST_S_C, mt, mc, ot + LST_PUV,
                              ot + LST_R, ot + LST_PCU, mt, ref)
            m_a = ma.to(ACC)
            s_a = sa.to(ACC)
            m_c = mc.to(ACC)
            s_c = sc.to(ACC)
            w = w.to(ACC)
            a_ref = ref.to(ACC)
            qu = qu.to(ACC)
            pu = pu.to(ACC)
            pvu = pvu.to(ACC)
            pwu = pwu.to(ACC)
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
            if PHASE == 2:   # (z_y from the statistics: y is -1 where another rank holds it)
                ce = (m1s - zy.to(ACC)) + l1
            else:
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
                if PHASE == 2:   # u_z = (z - zb) + fz in the sigma term (see the means above)
                    gz = _tsum(gk[:, None] * (gam * ikz[:, None] - cz[:, None] * (uz + fz[:, None])),
                               tok2, MB)
                else:
                    gz = _tsum(gk[:, None] * (gam * ikz[:, None] - cz[:, None] * uz), tok2, MB)
                if HAS_CE:
                    gz += gc * (tl.exp((z - m1s[:, None]) - l1[:, None]) - (offs == y).to(ACC))
                gz = _finish(gz, ignored, bad)
                tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
            if NEED_GV:
                gam_v = ts * tl.where(p > 0.0, p * u, 0.0)
                if PHASE == 2:
                    gv = gk[:, None] * (gam_v * ikv[:, None] - cv[:, None] * (uv + fv[:, None]))
                else:
                    gv = gk[:, None] * (gam_v * ikv[:, None] - cv[:, None] * uv)
                if HAS_ZP:
                    gv = gv * omr
                gv = _finish(gv, ignored, bad)
                tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                         mask=_tmask(inb, tok2, MB))
        if PHASE == 2:
            # D = T^2 log1p(X), X summed over the ranks: b = 0, a = T^2; or T^2 KL1: b = D,
            # a = X = 0 (use_x from the global statistics: the same on every rank)
            coef = tl.where(use_x, ts * ts, 0.0)
            D = tl.where(use_x, 0.0, ts * ts * kl1)
            xs = tl.where(use_x, xs, 0.0)
        else:
            D = ts * ts * tl.where(use_x, _log1p(xs), kl1)

    return D, ce, coef, xs
