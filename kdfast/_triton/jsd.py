"""The JSD kind of the Triton kernel for 0 < beta < 1 (beta in {0, 1} is the KL kind): the
log-space helpers (``_jsd_eps``, ``_jsd_q``, ``_jsd_p``, ``_jsd_loss_terms``, ``_jsd_sums``) and,
after ``common.softmax_stats``, the sums Bq, Bp, the loss and the gradients.

Two phases (kdfast/_spec.py, "Rounds"): round 0 is KLStat's lse pairs (``kl.kl_stats``, LSE_ONLY);
round 1 (``jsd_stats``), from the combined round 0, this rank's parts of the sums
SP = sum p sp(-delta), SQ = sum q sp(delta) (JSDTeacherStat); phase 2 (``jsd_kind``, ``PHASE`` 2)
takes Bq, Bp from the combined SQ, SP and writes the loss, a sum of nonnegative terms over the
columns, as ``b + X`` (b = a = 0, X this rank's part).
"""
import triton
import triton.language as tl

from .common import (
    _finish, _load_row, _load_teachers, _log1p, _phi_small, _phi_term, _pick, _softplus, _tmask)
from .kl import _comb_add

# round 1's columns per teacher (kdfast._spec.JSDTeacherStat), after round 0's KLStat columns
JS_SP: tl.constexpr = tl.constexpr(0)
JS_SQ: tl.constexpr = tl.constexpr(1)
JS_COUNT: tl.constexpr = tl.constexpr(2)


@triton.jit
def _jsd_eps(da, dc, lcla, lbr, wb, sg, ACC: tl.constexpr):
    """Per element of a JSD row (da = a - m_a, dc = c - m_c, per teacher): eps = log p - log q and
    lx, with delta = eps + log(beta/(1-beta)). |eps| <= 1 (near-equal: the log-ratios are small):
    lx = log1p(wb expm1(sg eps)), the side whose log-ratio is the smaller one, taken directly:
    -hq = log1p(beta expm1(eps)) for beta <= 1/2 (wb = beta, sg = 1), -hp = log1p((1 - beta)
    expm1(-eps)) beyond (wb = 1 - beta, sg = -1); the other is that one -+ eps (no cancellation:
    it is the larger). Else lx = log1p(e^-|delta|), the softplus remainder (sp(delta) =
    max(delta, 0) + lx, accurate when tiny: saturated rows). One log1p per element, its argument
    chosen per element; ``_jsd_q`` / ``_jsd_p`` finish the two sides from (eps, lx)."""
    ep = (dc - da) - lcla[:, None]
    near = tl.abs(ep) <= 1.0
    es = ep * sg
    lx = _log1p(tl.where(near, wb * (es + _phi_small(es, ACC)), tl.exp(-tl.abs(ep + lbr))))
    return ep, lx


@triton.jit
def _jsd_q(ep, lx, lbr, nl1b, cq, fq):
    """(hq, sq): hq = log q - log m = -log(1-beta) - sp(delta) (near: -lx, or -lx - eps when lx is
    -hp: cq = 1), and the student's gradient representation sq = sp(delta) (fq: R = -log(1-beta))
    or -hq (R = 0)."""
    near = tl.abs(ep) <= 1.0
    spf = tl.maximum(ep + lbr, 0.0) + lx
    hq = tl.where(near, -lx - cq * ep, nl1b - spf)
    spq = tl.where(near, nl1b - hq, spf)
    return hq, tl.where(fq[:, None], spq, -hq)


@triton.jit
def _jsd_p(ep, lx, lbr, nlb, cq, fp):
    """(hp, sp): hp = log p - log m = -log(beta) - sp(-delta) = hq + eps, and the teacher's
    gradient representation sp = sp(-delta) (fp: R = -log(beta)) or -hp (R = 0)."""
    near = tl.abs(ep) <= 1.0
    spf = tl.maximum(-(ep + lbr), 0.0) + lx
    hp = tl.where(near, (1.0 - cq) * ep - lx, nlb - spf)
    spp = tl.where(near, nlb - hp, spf)
    return hp, tl.where(fp[:, None], spp, -hp)


@triton.jit
def _jsd_loss_terms(p, q, hp, hq, beta, omb, ACC: tl.constexpr):
    """beta p phi(-hp) + (1 - beta) q phi(-hq) >= 0 per element: its row sum is
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (= p e^{-hp} = q e^{-hq})."""
    mm = beta * p + omb * q
    return beta * _phi_term(p, hp, mm, ACC) + omb * _phi_term(q, hq, mm, ACC)


@triton.jit
def _jsd_sums(da, q, dc, lc, lcla, lbr, nlb, nl1b, beta, omb, wb, sg, cq, fq, fp, NEED_GZ: tl.constexpr,
              NEED_GV: tl.constexpr, LOSS: tl.constexpr, ACC: tl.constexpr):
    """One block of JSD's pass 2 for (R, BLOCK) teacher rows dc = c - m_c (student da, q): the
    block's (Bq, Bp) terms with gradients, its loss terms without gradients or with ``LOSS``."""
    ep, lx = _jsd_eps(da, dc, lcla, lbr, wb, sg, ACC)
    p = tl.exp(dc - lc[:, None])
    hq, sq = _jsd_q(ep, lx, lbr, nl1b, cq, fq)
    hp, sp = _jsd_p(ep, lx, lbr, nlb, cq, fp)
    bq = tl.zeros([dc.shape[0]], ACC)
    bp = tl.zeros([dc.shape[0]], ACC)
    jl = tl.zeros([dc.shape[0]], ACC)
    if NEED_GZ:
        bq = tl.sum(tl.where(q > 0.0, q * sq, 0.0), 1)
    if NEED_GV:
        bp = tl.sum(tl.where(p > 0.0, p * sp, 0.0), 1)
    if LOSS or not (NEED_GZ or NEED_GV):
        jl = tl.sum(_jsd_loss_terms(p, q, hp, hq, beta, omb, ACC), 1)
    return bq, bp, jl


@triton.jit
def _jsd_consts(beta, omb, la, lc):
    """The row constants of JSD's pass 2 (see ``jsd_kind``): -log beta, -log(1 - beta), their
    difference log(beta / (1 - beta)), lc - la, and the near-equal side's (wb, sg, cq)."""
    nlb = -tl.log(beta)
    nl1b = -tl.log(omb)
    lbr = nl1b - nlb                  # log(beta / (1 - beta))
    lcla = lc - la                    # eps_j = (dc_j - da_j) - lcla
    hi_b = beta > 0.5                 # near-equal elements: log1p of the smaller side
    wb = tl.where(hi_b, omb, beta)
    sg = tl.where(hi_b, -1.0, 1.0)
    cq = tl.where(hi_b, 1.0, 0.0)
    return nlb, nl1b, lbr, lcla, wb, sg, cq


@triton.jit
def jsd_stats(
        out_ptr, row, M, tm, tok, tok2, C, z_row, v_rows, zp_row, cols, rho, beta, omr, omb, its,
        itt, lim, mas, mcs, la, lc, HAS_ZP: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, MB: tl.constexpr,
):
    """Round 1 of phase 1 (the combined round 0's maxima and log-sums given): this rank's parts of
    SP = sum_j p_j sp(-delta_j) and SQ = sum_j q_j sp(delta_j) per teacher (``_jsd_sums`` with the
    representations R = -log beta / -log(1 - beta): sp = sp(-delta), sq = sp(delta)) into
    ``out_ptr`` (N, 2M), float64."""
    nlb, nl1b, lbr, lcla, wb, sg, cq = _jsd_consts(beta, omb, la, lc)
    yes = tm >= 0
    sq = tl.zeros([MB], ACC)
    sp = tl.zeros([MB], ACC)
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP,
                           ACC)
        da = z * its - mas[:, None]
        q = tl.exp(da - la[:, None])
        b1, b2, _b3 = _jsd_sums(da, q, v * itt - mcs[:, None], lc, lcla, lbr, nlb, nl1b, beta,
                                omb, wb, sg, cq, yes, yes, True, True, False, ACC)
        sq += b1
        sp += b2
    ob = out_ptr + row * (JS_COUNT * M) + tm * JS_COUNT
    tl.store(ob + JS_SP, sp.to(tl.float64), mask=tok)
    tl.store(ob + JS_SQ, sq.to(tl.float64), mask=tok)


@triton.jit
def jsd_kind(
        v_ptr, gz_ptr, gv_ptr, M, stride_vm_vec, stride_gvm_vec, C, stride_v, stride_gz,
        stride_gv, row, tm, z_row, v_rows, zp_row, gv_rows, cols, rho, beta, omr, omb, its, itt,
        y, ignored, bad, live, lim, gk, gc, zt, c_ref, a_ref, D, ce, mas, mcs, la, lc, m1s, l1,
        HAS_CE: tl.constexpr, CE_SHARED: tl.constexpr, HAS_ZP: tl.constexpr, NEED_GZ: tl.constexpr,
        NEED_GV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
        MB: tl.constexpr, PHASE: tl.constexpr = 0, st_ptr=0, world=0, K=0, lim_m=0, zy=0.0,
):
    """JSD kind, after ``softmax_stats`` (phase 2: ``kl.kl_combine`` of round 0): returns (D per
    teacher, CE, a, X); writes the gradients. Phase 2: Bq, Bp from round 1's combined SQ, SP
    (``st_ptr``: gstats with row stride ``K``, round 1's columns after KLStat's), D the term's X
    (b = a = 0), ``zy`` the label logit from the statistics."""
    # Log space (docs/kernel-math.md, JSD): eps_j = log p_j - log q_j, delta_j = eps_j +
    # log(beta/(1-beta)), hq_j = log q_j - log m_j = -log(1-beta) - sp(delta_j),
    # hp_j = log p_j - log m_j = -log(beta) - sp(-delta_j) = hq_j + eps_j (``_jsd_eps``,
    # ``_jsd_q``, ``_jsd_p``: each accurate; no log of an underflowed m_j). Loss: sums of
    # nonnegative terms (``_jsd_loss_terms``),
    # KLq = sum q phi(-hq), KLp = sum p phi(-hp) (q e^{-hq} = p e^{-hp} = m; a q_j that
    # underflowed to 0 adds m_j: sum m = 1 is what makes the identity hold).
    # Gradient factors hq_j - KLq = Bq - sq_j, sq_j = R - hq_j, Bq = sum q sq (any per-row
    # constant R): R = -log(1-beta) (sq = sp(delta), Bq = Aq of the design: saturated rows,
    # where hq ~ -log(1-beta) at the student's argmax) or R = 0 (sq = -hq: rows where
    # hq ~ 0 there, e.g. near-equal rows), chosen from the teacher's value at the student's
    # argmax (pass 1) so that sq is small where q is large. Teacher alike (p, hp, argmax of
    # the teacher). Per teacher: m_m = beta p_m + (1 - beta) q, every statistic per teacher.
    nlb, nl1b, lbr, lcla, wb, sg, cq = _jsd_consts(beta, omb, la, lc)
    if PHASE == 2:
        # the ranks' SP, SQ summed. No arg-max references here (the layout has none): each
        # representation chosen from the sums themselves, the same on every rank. R = -log(1-beta):
        # Bq = SQ; R = 0: Bq = sum q (-hq) = sum q (sp(delta) - (-log(1-beta))) = SQ + log(1-beta)
        # (sum q = 1), taken where SQ is nearer -log(1-beta) than 0 (as the arg-max test picks the
        # smaller sq where q is large); teacher alike with SP, -log beta. (That difference rounds
        # at -log(1-beta): the C++ kernel's SQ - sp(delta_j) does likewise.)
        ob = st_ptr + row * K + ((K - JS_COUNT * M) + tm * JS_COUNT)
        rs = tl.num_programs(0).to(tl.int64) * K
        msk = tm < lim_m
        SP = _comb_add(ob, rs, world, tm * 0 + JS_SP, msk).to(ACC)
        SQ = _comb_add(ob, rs, world, tm * 0 + JS_SQ, msk).to(ACC)
        fq = SQ < 0.5 * nl1b
        fp = SP < 0.5 * nlb
    else:
        fq = _softplus(((c_ref - mcs) - lcla) + lbr) < 0.5 * nl1b
        fp = _softplus(((a_ref - mas) + lcla) - lbr) < 0.5 * nlb
    bq = zt
    bp = zt
    jl = zt
    # phase 2 with gradients and one teacher: the loss in the gradient sweep, no pass 2
    p2_end = C
    if PHASE == 2 and MB == 1 and (NEED_GZ or NEED_GV):
        p2_end = 0
    # Pass 2: Bq, Bp; the loss here without gradients or with several teachers (one
    # teacher: in the gradient sweep, which has the registers to spare in half blocks; the
    # gradient sweep of several teachers carries the student gradient across them).
    # Several teachers: one teacher row at a time, as in the gradient sweep below.
    for start in range(0, p2_end, BLOCK):
        offs = start + cols
        mask = offs < lim
        z = _load_row(z_row, offs, mask, ACC)
        da = z * its - mas[:, None]
        q = tl.exp(da - la[:, None])
        if MB == 1:
            v = _load_teachers(v_rows, zp_row, offs, mask, mask, rho, omr, HAS_ZP, ACC)
            b1, b2, b3 = _jsd_sums(da, q, v * itt - mcs[:, None], lc, lcla, lbr, nlb, nl1b,
                                   beta, omb, wb, sg, cq, fq, fp, NEED_GZ, NEED_GV, False, ACC)
            bq += b1
            bp += b2
            jl += b3
        else:
            for m in range(0, M):
                sel = tm == m
                vm_row = v_ptr + row * stride_v + m * (stride_vm_vec * VEC)
                v = _load_teachers(vm_row, zp_row, offs, mask, mask, rho, omr, HAS_ZP, ACC)
                b1, b2, b3 = _jsd_sums(da, q, v * itt - _pick(mcs, sel)[:, None],
                                       _pick(lc, sel), _pick(lcla, sel), lbr, nlb, nl1b,
                                       beta, omb, wb, sg, cq, _pick(fq.to(ACC), sel) > 0.5,
                                       _pick(fp.to(ACC), sel) > 0.5, NEED_GZ, NEED_GV, True,
                                       ACC)
                bq += tl.where(sel, b1, 0.0)
                bp += tl.where(sel, b2, 0.0)
                jl += tl.where(sel, b3, 0.0)
    if PHASE == 2:
        bq = tl.where(fq, SQ, SQ - nl1b)
        bp = tl.where(fp, SP, SP - nlb)
    if HAS_CE:
        if PHASE == 2:
            ce = (m1s - zy) + l1
        else:
            ce = (m1s - tl.load(z_row + y, mask=live, other=0.0).to(ACC)) + l1
    if NEED_GZ or NEED_GV:
        cz = gk * its * omb
        cv = gk * itt * beta
        if HAS_ZP:
            cv = cv * omr
        if MB == 1:
            # half blocks where a thread holds 16 columns (BLOCK >= 2048: the launcher's
            # warps): the per-element work of the loss and both gradients does not fit the
            # register budget at 16 (python -m kdfast.inspect: spills), and 8 still make a
            # 128-bit access for 16-bit rows; one reduction per half block
            if BLOCK >= 2048:
                cols_h = tl.arange(0, BLOCK // 2)[None, :]
                step = BLOCK // 2
            else:
                cols_h = cols
                step = BLOCK
            for start in range(0, C, step):
                offs = start + cols_h
                inb = offs < C
                mask = offs < lim
                z = _load_row(z_row, offs, mask, ACC)
                v = _load_teachers(v_rows, zp_row, offs, mask, mask, rho, omr, HAS_ZP, ACC)
                da = z * its - mas[:, None]
                dc = v * itt - mcs[:, None]
                ep, lx = _jsd_eps(da, dc, lcla, lbr, wb, sg, ACC)
                q = tl.exp(da - la[:, None])
                p = tl.exp(dc - lc[:, None])
                hq, sq = _jsd_q(ep, lx, lbr, nl1b, cq, fq)
                hp, sp = _jsd_p(ep, lx, lbr, nlb, cq, fp)
                jl += tl.sum(_jsd_loss_terms(p, q, hp, hq, beta, omb, ACC), 1)
                if NEED_GZ:
                    # dD/dz_j = (1/T)(1 - beta) q_j (hq_j - KLq) = (1/T)(1 - beta) q_j (Bq - sq_j)
                    gz = cz * tl.where(q > 0.0, q * (bq[:, None] - sq), 0.0)
                    if HAS_CE:
                        if CE_SHARED:
                            q1 = q
                        else:
                            q1 = tl.exp((z - m1s[:, None]) - l1[:, None])
                        gz += gc * (q1 - (offs == y).to(ACC))
                    gz = _finish(gz, ignored, bad)
                    tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
                if NEED_GV:
                    # dD/dv_j = (1/T) beta p_j (hp_j - KLp) = (1/T) beta p_j (Bp - sp_j)
                    gv = cv * tl.where(p > 0.0, p * (bp[:, None] - sp), 0.0)
                    gv = _finish(gv, ignored, bad)
                    tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty), mask=inb)
        else:
            # several teachers: the student block once, then one teacher row at a time
            # ((1, BLOCK) tiles: the (MB, BLOCK) tile of this per-element work does not fit
            # the register budget), the student gradient summed over them in registers:
            # multi: dL/dz_j = sum_m kd_w[m] (1/T)(1 - beta) q_j (Bq_m - sq_mj)
            for start in range(0, C, BLOCK):
                offs = start + cols
                inb = offs < C
                mask = offs < lim
                z = _load_row(z_row, offs, mask, ACC)
                da = z * its - mas[:, None]
                q = tl.exp(da - la[:, None])
                gzs = tl.zeros([1, BLOCK], ACC)
                for m in range(0, M):   # a runtime loop: no interleaving of the teachers
                    sel = tm == m
                    vm_row = v_ptr + row * stride_v + m * (stride_vm_vec * VEC)
                    v = _load_teachers(vm_row, zp_row, offs, mask, mask, rho, omr, HAS_ZP, ACC)
                    dc = v * itt - _pick(mcs, sel)[:, None]
                    ep, lx = _jsd_eps(da, dc, _pick(lcla, sel), lbr, wb, sg, ACC)
                    p = tl.exp(dc - _pick(lc, sel)[:, None])
                    _hq, sq = _jsd_q(ep, lx, lbr, nl1b, cq, _pick(fq.to(ACC), sel) > 0.5)
                    _hp, sp = _jsd_p(ep, lx, lbr, nlb, cq, _pick(fp.to(ACC), sel) > 0.5)
                    if NEED_GZ:
                        gzm = _pick(cz, sel) * tl.where(q > 0.0, q * (_pick(bq, sel)[:, None] - sq), 0.0)
                        gzs += gzm
                    if NEED_GV:
                        # dD/dv_mj = (1/T) beta p_mj (Bp_m - sp_mj)
                        gv = _pick(cv, sel) * tl.where(p > 0.0, p * (_pick(bp, sel)[:, None] - sp), 0.0)
                        gv = _finish(gv, ignored, bad)
                        gvm_row = gv_ptr + row * stride_gv + m * (stride_gvm_vec * VEC)
                        tl.store(gvm_row + offs, gv.to(gv_ptr.dtype.element_ty), mask=inb)
                if NEED_GZ:
                    gz = gzs
                    if HAS_CE:
                        if CE_SHARED:
                            q1 = q
                        else:
                            q1 = tl.exp((z - m1s[:, None]) - l1[:, None])
                        gz += gc * (q1 - (offs == y).to(ACC))
                    gz = _finish(gz, ignored, bad)
                    tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
    if PHASE == 2:   # the loss is a sum over the columns: b = a = 0, X this rank's part
        coef = zt
        xs = jl
        D = zt
    else:
        coef = zt
        xs = zt
        D = jl
    return D, ce, coef, xs
