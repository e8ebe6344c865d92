"""The KL kind of the Triton kernel: kd, ttm, wttm, retro_kd and jsd at beta in {0, 1} (forward and
reverse KL). Pass 2 (after ``common.softmax_stats``): the loss (one-pass KL1, or log1p of X
accumulated in the gradient sweep) and the gradients.
"""
import triton
import triton.language as tl

from .common import (
    _finish, _load_row, _load_teachers, _log1p, _phi_term, _ref, _safe, _tmask, _tsum, _x_plan)


@triton.jit
def kl_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tok, tok2, z_row, v_rows, zp_row, gv_rows, cols,
        scale, rho, omr, its, itt, y, ignored, bad, live, lim, gk, gc, zt, s_a, s_c, w, c_ref,
        a_ref, m_u, s_u, D, ce, mas, mcs, la, lc, m1s, l1, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, WTTM: tl.constexpr, REVERSE: tl.constexpr, HAS_ZP: tl.constexpr,
        NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
        MB: tl.constexpr,
):
    """KL kind, after ``softmax_stats``: returns (D per teacher, CE); writes the gradients."""
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
    D = sf * tl.where(use_x, _log1p(xs), kl1)

    return D, ce
