"""The DKD kind of the Triton kernel (decoupled KD: TCKD at the label, NCKD the KL kind over
j != y). Pass 2 (after ``common.softmax_stats``, run over j != y): the loss and the gradients.
"""
import triton
import triton.language as tl

from .common import (
    _finish, _load_row, _load_teachers, _log1p, _phi_term, _ref, _softplus, _tmask, _tsum,
    _x_plan)


@triton.jit
def dkd_kind(
        gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base, v_rows, zp_row,
        gv_rows, cols, ts, rho, alpha, beta, omr, its, itt, y, ignored, bad, live, lim, lim_m,
        gk, gc, zt, s_c, w, a_ref, D, ce, mas, mcs, la, lc, m1s, l1, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, HAS_ZP: tl.constexpr, NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr,
        ACC: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr, PHASE: tl.constexpr = 0, zy=0.0,
        vy=0.0,
):
    """DKD kind, after ``softmax_stats`` (phase 2: ``kl.kl_combine``, the streams over j != y as
    pass 1 leaves them): returns (D per teacher, CE, a, X); writes the gradients of the row's columns
    here. Fused (``PHASE`` 0): D the term, a and X unused. Phase 2: D is the term's ``b`` of
    ``b + a log1p(X)`` (kdfast/_spec.py), X this rank's part of NCKD's sum; ``zy`` / ``vy`` the label
    logits (raw; the teachers' as the loss sees them) from the combined statistics (``y`` is -1 on
    the ranks not holding the label)."""
    # Pass 1 gave the non-target statistics (m, l over j != y) and W over j != y: NCKD is the
    # KL kind over j != y. The target: t_p = logit p_y = log p_y - log(1 - p_y)
    # = (c_y - m_c) - lc, t_q likewise; p_y, 1 - p_y as sigmoids of t_p (no cancellation).
    # Student quantities (1,), teacher quantities (MB,): TCKD_m, NCKD_m, G_m per teacher.
    if PHASE == 2:   # (the holding rank's values, summed with the others' zeros: exact)
        cy = vy * itt
    else:
        zy = tl.load(z_row + y, mask=live, other=0.0).to(ACC)
        cy = _load_teachers(v_base, zp_row, y, tm < lim_m, live, rho, omr, HAS_ZP, ACC) * itt
    ay = zy * its
    tp = (cy - mcs) - lc
    tq = (ay - mas) - la
    G = tp - tq          # log(p_y/q_y) - log((1-p_y)/(1-q_y))
    sp_p = _softplus(tp)     # -log(1 - p_y)
    sp_np = _softplus(-tp)   # -log p_y
    sp_q = _softplus(tq)
    sp_nq = _softplus(-tq)
    py = tl.exp(-sp_np)
    omp = tl.exp(-sp_p)      # 1 - p_y
    qy = tl.exp(-sp_nq)
    omq = tl.exp(-sp_q)
    # TCKD = tbar = p_y r + (1-p_y) s, r = log p_y - log q_y, s = log(1-p_y) - log(1-q_y);
    # accurately log1p(p_y phi(-(r - tbar)) + (1-p_y) phi(-(s - tbar))), r - tbar = (1-p_y) G,
    # s - tbar = -p_y G, p_y e^{-(r - tbar)} = q_y e^tbar (when tbar <= 1, as for KL)
    tbar = py * (sp_nq - sp_np) + omp * (sp_q - sp_p)
    et = tl.exp(tl.minimum(tbar, 1.0))
    ty = _phi_term(py, omp * G, qy * et, ACC) + _phi_term(omp, -(py * G), omq * et, ACC)
    tckd = tl.where(tbar <= 1.0, _log1p(ty), tbar)
    ar = _ref(a_ref, mas)
    dbar = w / s_c
    doff = mas - ar
    kl1 = (dbar + doff) - (lc - la)   # NCKD, one pass
    if HAS_CE:
        if CE_SHARED:
            ce = sp_nq       # -log q_y
        else:
            ce = (m1s - zy) + l1
    # G p_y (1 - p_y) -> 0 as p_y -> 0 or 1
    Gp = tl.where((py > 0.0) & (omp > 0.0), alpha * G * py, 0.0)
    # q_y - p_y from the smaller pair (p_y, q_y or their complements)
    dqp = tl.where(py + qy > 1.0, omp - omq, qy - py)
    gkt = (gk * ts)[:, None]
    gty = (alpha * dqp)[:, None]    # per teacher: alpha (q_y - p_my)
    gtn = -gty
    tcv = (Gp * omp)[:, None]
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
        tgt = offs == y
        a = z * its
        da = a - mas[:, None]
        dc = v * itt - mcs[:, None]
        qh = tl.where(tgt, 0.0, tl.exp(da - la[:, None]))
        ph = tl.where(tgt, 0.0, tl.exp(dc - lc[:, None]))
        # NCKD's u over j != y (target lane: p^ = q^ = 0)
        u = (dc - (a - ar[:, None])) - dbar[:, None]
        xs += tl.sum(_phi_term(ph, u, qh * ex[:, None], ACC), 1)
        if NEED_GZ:
            # j = y : dD/dz_j = T alpha (q_y - p_y)
            # j != y: dD/dz_j = T (alpha (q_j - (1 - p_y) q^_j) + beta (q^_j - p^_j))
            #                 = T (alpha (p_y - q_y) q^_j + beta (q^_j - p^_j))   (q_j = (1-q_y) q^_j)
            # multi: sum_m kd_w[m] T (...)_m, p_y, p^ of teacher m
            gkd = tl.where(tgt, gty, gtn * qh + beta * (qh - ph))
            gz = _tsum(gkt * gkd, tok2, MB)
            if HAS_CE:
                if CE_SHARED:
                    q1 = tl.where(tgt, qy[:, None], omq[:, None] * qh)
                else:
                    q1 = tl.exp((z - m1s[:, None]) - l1[:, None])
                gz += gc * (q1 - tgt.to(ACC))
            gz = _finish(gz, ignored, bad)
            tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
        if NEED_GV:
            # dD/dv_j = T alpha G p_y ([j = y] - p_j) + T beta [j != y] p^_j u_j
            # with p_j = (1 - p_y) p^_j (j != y), 1 - p_y at j = y
            tc = tl.where(tgt, tcv, -tcv * ph)
            nc = tl.where(ph > 0.0, ph * u, 0.0)
            gv = gkt * (tc + beta * nc)
            if HAS_ZP:
                gv = gv * omr
            gv = _finish(gv, ignored, bad)
            tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                     mask=_tmask(inb, tok2, MB))
    if PHASE == 2:
        # D = T^2 (alpha TCKD + beta log1p(X)), X summed over the ranks: b = T^2 alpha TCKD,
        # a = T^2 beta; or the one-pass NCKD1: b = D, a = X = 0 (use_x from the global statistics:
        # the same on every rank; X = 0 also where beta = 0, a then 0)
        coef = tl.where(use_x, ts * ts * beta, 0.0)
        D = ts * ts * (alpha * tckd + beta * tl.where(use_x, 0.0, kl1))
        xs = tl.where(use_x & (coef != 0.0), xs, 0.0)
    else:
        coef = zt
        nckd = tl.where(use_x, _log1p(xs), kl1)
        D = ts * ts * (alpha * tckd + beta * nckd)

    return D, ce, coef, xs
