"""The fused distillation row kernel (one Triton kernel family, constexpr flags per loss kind).

One program per row. The row is swept in ``BLOCK``-column chunks: pass 1 gathers the row statistics
(online log-sum-exp with a block-level max: one rescale ``exp`` per block and statistic), pass 2
(and pass 3 for LS / JSD) computes the loss terms and writes the gradients once, in the input
dtype, with ``grad_scale * weight`` folded in. The math is docs/kernel-math.md (the numerically
stable forms: a max and its log-sum are never added into one rounded lse, log q_j = (a_j - m_a) -
log S_a; the KL kinds' loss is log1p of a sum of nonnegative terms, accumulated in the gradient
sweep, or in a sweep of its own for forward-only calls only when the one-pass value would cancel;
JSD in log space); each gradient line below restates the formula it implements.

Multi-teacher (``MB`` > 1): the program of row i also reads the rows i of M teachers, in the same
passes, the student row still once per pass. Student values are ``(1, BLOCK)`` tiles, teacher values
``(MB, BLOCK)`` tiles (slot m = teacher m; slots M <= m < MB pad M up to a power of two: their loads
are masked off and whatever they compute is dropped), student statistics ``(1,)`` vectors and teacher
statistics ``(MB,)`` vectors. The student gradient is written once: the sum over the teachers of each
teacher's single-teacher expression with its weight ``kd_w[m, i]`` (``_tsum``), plus the CE term; each
teacher gets its own gradient row. With ``MB == 1`` (``distill_forward``) every tile is ``(1, BLOCK)``
and ``_tsum`` / the teacher masks vanish at compile time: the single-teacher kernel.

Conventions inside the kernel:
- every load is upcast to ``ACC`` (fp32, or fp64 for fp64 inputs) right away;
- lanes outside the row (and every lane of an ignored / bad-label row: ``live`` is false, so those
  rows cost no reads) load ``-inf``, which is probability 0 in every softmax; products with a
  probability are guarded (``where(p > 0, ...)``) so ``0 * inf`` never makes a NaN;
- the row's outputs are finally overwritten with 0 (ignored row) or NaN (label outside [0, C)).

Two phases (tensor parallelism: ``PHASE`` 1 / 2, kdfast/_spec.py "Two phases"; the kinds of
``TRITON_PHASED_KINDS``, the C++ kernel's layouts): phase 1 runs pass 1 over this rank's columns and
stores the row's statistics (``kl.kl_stats`` for KL / DKD / JSD's round 0, ``lm_stats`` for LM and
LS's round 0; ``ROUND`` > 0, JSD's and LS's later rounds, from the combined earlier ones); phase 2
combines every rank's (``kl.kl_combine`` and the ``_comb_*`` helpers, in float64) into what pass 1
gives the fused kernel, then runs the kind's later passes over the local columns, writing each loss
term as ``b + a log1p(X)`` (or ``b + X``) with this rank's part of X. ``PHASE`` 0 (fused) compiles
to the single-call kernel as before: every phase branch is a constexpr ``if``.

Layout: this module holds the kernel (its arguments, the row setup, the dispatch on ``KIND`` and the
stores); ``common.py`` the shared primitives and pass 1 of the softmax kinds; ``kl.py``, ``dkd.py``,
``logit_matching.py``, ``ls.py``, ``jsd.py`` each kind's passes (``<kind>_kind``), called with the
row's state; the top-k teacher has its own kernel (``topk.py``).
"""
import triton
import triton.language as tl

from .common import (
    KIND_DKD, KIND_JSD, KIND_KL, KIND_LM, KIND_LS, NEG_INF, _finish, _safe, softmax_stats,
    stats_end)
from .dkd import dkd_kind
from .jsd import JS_COUNT, jsd_kind, jsd_stats
from .kl import ST_COUNT, STT_COUNT, kl_combine, kl_kind, kl_stats
from .logit_matching import lm_kind
from .ls import ls_kind


@triton.jit
def _distill_kernel(
    z_ptr, v_ptr, zp_ptr, lab_ptr, kdw_ptr, cew_ptr, gs_ptr,
    d_ptr, ce_ptr, gz_ptr, gv_ptr,
    # C and the row strides in units of VEC elements (see below)
    C_vec, stride_z_vec, stride_v_vec, stride_zp_vec, stride_gz_vec, stride_gv_vec,
    # teachers: M of them (<= MB), teacher m's rows at v_ptr + m * stride_vm (grad_v likewise, in
    # VEC units); kd_w and d_out are (M, N) with teacher stride stride_wm (elements). One teacher:
    # M = 1 and the strides are never used (multiplied by the constant slot index 0).
    M, stride_vm_vec, stride_gvm_vec, stride_wm,
    # fparams split into an fp32 head and remainder (hi + lo == the Python float to ~48 bits), so the
    # fp64 path gets fp64 parameters while the fp32 path just uses hi (+ lo rounds back to hi).
    ts_hi, tt_hi, scale_hi, rho_hi, alpha_hi, beta_hi,
    ts_lo, tt_lo, scale_lo, rho_lo, alpha_lo, beta_lo,
    ignore_index,
    # the two phases (kdfast/_spec.py, "Two phases"; unused when PHASE == 0): the tensors
    # are the columns [col0, col0 + C) of rows of ``vocab`` columns; phase 1 writes each row's
    # statistics to st_ptr (N, K), phase 2 reads the ``world`` ranks' from st_ptr (world, N, K) and
    # writes the loss terms' a and X to coef_ptr / part_ptr (M + 1, N) (float64 all)
    st_ptr, coef_ptr, part_ptr, col0, vocab, world,
    KIND: tl.constexpr,       # 0 KL, 1 DKD, 2 LM, 3 LS, 4 JSD (kdfast._spec.Kind)
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,     # CE term (only with labels)
    CE_SHARED: tl.constexpr,  # CE's lse(z) is the student lse at Ts (Ts == 1, KL/DKD/JSD kinds)
    WTTM: tl.constexpr,       # KL: factor U = exp(lse(v/Tt) - lse(v)/Tt) instead of ``scale``
    REVERSE: tl.constexpr,    # KL: KL(q || p)
    HAS_ZP: tl.constexpr,     # retro_kd: teacher row r = (1 - rho) v + rho zp
    CENTER: tl.constexpr,     # LM: subtract the row means
    NEED_GZ: tl.constexpr,
    NEED_GV: tl.constexpr,
    ACC: tl.constexpr,        # accumulation dtype: tl.float32 or tl.float64
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,        # C and every row stride are multiples of VEC (the launcher's choice)
    MB: tl.constexpr = 1,     # teacher slots: next_power_of_2(M)
    PHASE: tl.constexpr = 0,  # 0 fused, 1 statistics, 2 finish (kdfast._spec.Phase)
    ROUND: tl.constexpr = 0,  # phase 1's round (kdfast._spec.stats_rounds): round r > 0 reads the
                              # earlier rounds' gathered statistics (world, N, K_0 + ...) from
                              # st_ptr and writes its own (N, K_r) to part_ptr
):
    # Multiplying back by the constexpr VEC tells the compiler that every row starts 16 bytes
    # aligned (VEC = 16 bytes / element size when C and the strides allow it): 128-bit loads and
    # stores for any such C (C = 1000 included), which Triton's own specialisation only infers for
    # multiples of 16. VEC = 1 otherwise.
    C = C_vec * VEC
    stride_z = stride_z_vec * VEC
    stride_v = stride_v_vec * VEC
    stride_zp = stride_zp_vec * VEC
    stride_gz = stride_gz_vec * VEC
    stride_gv = stride_gv_vec * VEC
    row = tl.program_id(0).to(tl.int64)
    tm = tl.arange(0, MB).to(tl.int64)   # teacher slots
    tok = tm < M                         # slot holds a teacher
    tok2 = tok[:, None]
    z_row = z_ptr + row * stride_z
    v_base = v_ptr + row * stride_v + tm * (stride_vm_vec * VEC)    # (MB,) row starts
    v_rows = v_base[:, None]                                        # (MB, 1)
    zp_row = zp_ptr + row * stride_zp
    gv_rows = (gv_ptr + row * stride_gv + tm * (stride_gvm_vec * VEC))[:, None]
    cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK): student tiles; teacher tiles are (MB, BLOCK)

    ts = tl.cast(ts_hi, ACC) + tl.cast(ts_lo, ACC)
    tt = tl.cast(tt_hi, ACC) + tl.cast(tt_lo, ACC)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    rho = tl.cast(rho_hi, ACC) + tl.cast(rho_lo, ACC)
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    # 1 - rho, 1 - beta from hi and lo (1 - hi is exact for hi >= 1/2): in the fp32 path
    # 1 - fl(beta) would be off by eps / (1 - beta) relative (jsd at beta = 0.993: 4e-6 in the loss)
    omr = (1.0 - tl.cast(rho_hi, ACC)) - tl.cast(rho_lo, ACC)
    omb = (1.0 - tl.cast(beta_hi, ACC)) - tl.cast(beta_lo, ACC)
    its = 1.0 / ts
    itt = 1.0 / tt
    Cf = tl.cast(C, ACC)

    # ---- the row's label: ignored / bad rows load nothing (live == False) ----
    if HAS_LABELS:
        y = tl.load(lab_ptr + row)
        ignored = y == ignore_index
        if PHASE == 0:
            bad = ((y < 0) | (y >= C)) & (y != ignore_index)
            y = tl.where(ignored | bad, 0, y).to(tl.int32)  # in bounds from here on
            here = (ignored | bad) == 0
        else:
            # a global class id: bad outside [0, vocab); ``y`` from here on its local column when
            # this rank holds it (``here``), else -1 (no column: the CE's -1 is another rank's)
            bad = ((y < 0) | (y >= vocab)) & (y != ignore_index)
            y = y - col0
            here = ((y >= 0) & (y < C) & ((ignored | bad) == 0)) != 0   # (a bool: a load mask)
            y = tl.where(here, y, -1).to(tl.int32)
    else:
        ignored = row < 0
        bad = row < 0
        here = row < 0
        y = (row * 0 - 1).to(tl.int32)  # matches no column
    live = (ignored | bad) == 0
    # the row's live extent: C, or 0 for an ignored / bad row (``offs < lim`` is then all false).
    # One comparison instead of ``(offs < C) & live`` (a block & scalar mask, which the 3.9
    # interpreter widens to int32 and then refuses as a load mask).
    lim = tl.where(live, C, 0)
    lim_m = tl.where(live, M, 0)         # likewise for the teacher slots of a per-row gather

    if PHASE != 1:   # (phase 1 has no weights)
        g = tl.load(gs_ptr).to(ACC)
        if MB == 1:
            wkd = tl.load(kdw_ptr + row + tm * stride_wm).to(ACC)
        else:
            wkd = tl.load(kdw_ptr + row + tm * stride_wm, mask=tok, other=0.0).to(ACC)
        wce = tl.load(cew_ptr + row).to(ACC)
        gk = g * wkd  # (MB,): factor of every distillation gradient, per teacher
        gc = g * wce  # factor of the CE gradient
    else:            # (passed along, never used)
        gk = tl.sum(tl.zeros([MB, BLOCK], ACC), 1)
        gc = tl.sum(gk, 0)

    # accumulators, (1,) for student statistics and (MB,) per teacher (not every kind uses every one)
    zs = tl.sum(tl.zeros([1, BLOCK], ACC), 1)
    zt = tl.sum(tl.zeros([MB, BLOCK], ACC), 1)
    m_a = zs + NEG_INF   # student lse at Ts (DKD: over j != y; LS: of standardised z)
    s_a = zs
    m_c = zt + NEG_INF   # teacher lse at Tt (DKD: over j != y)
    s_c = zt
    w = zt               # KL / DKD: W = sum exp(c - m_c) d  (reverse: sum exp(a - m_a) (-d))
    c_ref = zt + NEG_INF  # JSD: c at the student's argmax, a at each teacher's argmax
    a_ref = zt + NEG_INF
    m_1 = zs + NEG_INF   # lse(z) at temperature 1 for CE when not shared
    s_1 = zs
    m_u = zt + NEG_INF   # wttm: lse(v) at temperature 1
    s_u = zt
    D = zt
    ce = zs

    # Multi-teacher: every D_m below is the single-teacher D of (teacher m, student), so
    # d(sum_m kd_w[m] D_m + ce_w CE)/dz = sum_m kd_w[m] dD_m/dz + ce_w dCE/dz (the same expression per
    # teacher, statistics of the student computed once, of each teacher per slot), and
    # d(...)/dv_m = kd_w[m] dD_m/dv_m: the single-teacher teacher gradient with that teacher's weight.

    # ======================================================================================
    # Per kind: statistics, then the loss and the gradients (kdfast/_triton/<kind>.py)
    # ======================================================================================
    if KIND == KIND_LM:
        D, ce, coef, xs = lm_kind(gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row,
            v_base, v_rows, zp_row, gv_rows, cols, rho, omr, Cf, y, ignored, bad, live, lim, lim_m,
            gk, gc, zs, zt, m_1, s_1, D, ce, HAS_CE, CE_SHARED, HAS_ZP, CENTER, NEED_GZ, NEED_GV,
            ACC, BLOCK, MB, PHASE, HAS_LABELS, st_ptr, M, world, vocab, here)
    elif KIND == KIND_LS:
        D, ce, coef, xs = ls_kind(gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row, v_base,
            v_rows, zp_row, gv_rows, cols, ts, rho, omr, its, Cf, y, ignored, bad, live, lim, lim_m,
            gk, gc, zs, zt, m_a, s_a, m_c, s_c, w, a_ref, m_1, s_1, D, ce, HAS_CE, HAS_ZP, NEED_GZ,
            NEED_GV, ACC, BLOCK, MB, PHASE, ROUND, HAS_LABELS, st_ptr, part_ptr, M, world, vocab,
            here)
    else:
        zy = zs
        vy = zt
        kst = M * 0
        if PHASE == 2 or ROUND > 0:
            # phase 2 (and JSD's round 1): pass 1's statistics are every rank's, combined (kl.py);
            # then the row constants and the sweeps over the local columns as in the fused kernel
            kst = ST_COUNT + M * STT_COUNT   # gstats' row: round 0's columns, then JSD's round 1
            if PHASE == 2 and KIND == KIND_JSD:
                kst = kst + JS_COUNT * M
            m_a, s_a, m_c, s_c, w, ref, m_u, s_u, m_1, s_1, zy, vy = kl_combine(st_ptr, row, M, tm,
                world, live, lim_m, kst, HAS_LABELS, HAS_CE, CE_SHARED, WTTM, REVERSE, ACC)
            if KIND == KIND_DKD and HAS_CE and not CE_SHARED:
                # DKD's CE pair is over j != y (as its other streams): the label column added
                # back, lse(z) = logaddexp(lse_{j != y} z, z_y): M = max(m_1, z_y),
                # S = S_1 e^(m_1 - M) + e^(z_y - M)
                m1n = tl.maximum(m_1, zy)
                s_1 = tl.where(s_1 > 0.0, s_1 * tl.exp(_safe(m_1) - m1n), 0.0) + tl.exp(zy - m1n)
                m_1 = m1n
            mas, mcs, la, lc, m1s, l1 = stats_end(m_a, s_a, m_c, s_c, m_1, s_1, CE_SHARED)
            if REVERSE:
                c_ref = ref
            else:
                a_ref = ref
        else:
            mas, mcs, la, lc, m1s, l1, c_ref, a_ref, s_a, s_c, w, m_u, s_u, m_1, s_1 = \
                softmax_stats(C, tok2, z_row, v_rows, zp_row, cols, rho, omr, its, itt, y, lim, m_a,
                    s_a, m_c, s_c, w, c_ref, a_ref, m_1, s_1, m_u, s_u, KIND, HAS_CE, CE_SHARED,
                    WTTM, REVERSE, HAS_ZP, ACC, BLOCK, MB, KIND == KIND_DKD and PHASE == 1)
        if PHASE == 1 and ROUND == 0:
            # KL / DKD / JSD, phase 1: the statistics over the local columns are the output (DKD's
            # streams over j != y; JSD's lse pairs only: KLStat's layout, as the C++ kernel's)
            kl_stats(st_ptr, row, M, tm, tok, z_row, v_base, zp_row, y, here, rho, omr, mas, mcs,
                s_a, s_c, w, a_ref, c_ref, m_u, s_u, m_1, s_1, HAS_LABELS, HAS_CE, CE_SHARED, WTTM,
                REVERSE, HAS_ZP, ACC, KIND == KIND_JSD)
        elif PHASE == 1:
            # JSD, round 1: this rank's parts of SP, SQ from the combined round 0
            jsd_stats(part_ptr, row, M, tm, tok, tok2, C, z_row, v_rows, zp_row, cols, rho, beta,
                omr, omb, its, itt, lim, mas, mcs, la, lc, HAS_ZP, ACC, BLOCK, MB)
        elif KIND == KIND_KL:
            D, ce, coef, xs = kl_kind(gz_ptr, gv_ptr, C, stride_gz, row, tok, tok2, z_row, v_rows,
                zp_row, gv_rows, cols, scale, rho, omr, its, itt, y, ignored, bad, live, lim, gk,
                gc, zt, s_a, s_c, w, c_ref, a_ref, m_u, s_u, D, ce, mas, mcs, la, lc, m1s, l1,
                HAS_CE, CE_SHARED, WTTM, REVERSE, HAS_ZP, NEED_GZ, NEED_GV, ACC, BLOCK, MB, PHASE,
                zy)
        elif KIND == KIND_DKD:
            D, ce, coef, xs = dkd_kind(gz_ptr, gv_ptr, C, stride_gz, row, tm, tok, tok2, z_row,
                v_base, v_rows, zp_row, gv_rows, cols, ts, rho, alpha, beta, omr, its, itt, y,
                ignored, bad, live, lim, lim_m, gk, gc, zt, s_c, w, a_ref, D, ce, mas, mcs, la, lc,
                m1s, l1, HAS_CE, CE_SHARED, HAS_ZP, NEED_GZ, NEED_GV, ACC, BLOCK, MB, PHASE, zy,
                vy)
        else:  # KIND_JSD, T = ts = tt, 0 < beta < 1
            D, ce, coef, xs = jsd_kind(v_ptr, gz_ptr, gv_ptr, M, stride_vm_vec, stride_gvm_vec, C,
                stride_v, stride_gz, stride_gv, row, tm, z_row, v_rows, zp_row, gv_rows, cols, rho,
                beta, omr, omb, its, itt, y, ignored, bad, live, lim, gk, gc, zt, c_ref, a_ref, D,
                ce, mas, mcs, la, lc, m1s, l1, HAS_CE, CE_SHARED, HAS_ZP, NEED_GZ, NEED_GV, ACC,
                BLOCK, VEC, MB, PHASE, st_ptr, world, kst, lim_m, zy)

    if PHASE != 1:
        # D_m unweighted per teacher (d_out is (M, N)); CE once (phase 2: their b)
        if MB == 1:
            tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad))
        else:
            tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad), mask=tok)
        if HAS_CE:
            tl.store(ce_ptr + row, tl.sum(_finish(ce, ignored, bad), 0))
        else:
            tl.store(ce_ptr + row, tl.sum(zs, 0))
    if PHASE == 2:
        # the terms' a and this rank's X: teacher m's at [m, row] of the (M + 1, N) buffers, CE's
        # at [M, row]: a = X = 0 (this kernel's CE is one-pass, (m_1 - z_y) + l_1, always b)
        n_rows = tl.num_programs(0).to(tl.int64)
        tl.store(coef_ptr + tm * n_rows + row, _finish(coef, ignored, bad).to(tl.float64),
                 mask=tok)
        tl.store(part_ptr + tm * n_rows + row, _finish(xs, ignored, bad).to(tl.float64),
                 mask=tok)
        tl.store(coef_ptr + M * n_rows + row, tl.sum(zs.to(tl.float64), 0))
        tl.store(part_ptr + M * n_rows + row, tl.sum(zs.to(tl.float64), 0))
