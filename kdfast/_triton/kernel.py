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
"""
import triton
import triton.language as tl

KIND_KL: tl.constexpr = tl.constexpr(0)
KIND_DKD: tl.constexpr = tl.constexpr(1)
KIND_LM: tl.constexpr = tl.constexpr(2)
KIND_LS: tl.constexpr = tl.constexpr(3)
KIND_JSD: tl.constexpr = tl.constexpr(4)

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _lse_update(m, s, x):
    """Online log-sum-exp over one block ``x``: returns (m', s', rescale, exp(x - m')).

    m' = max(m, max x); s' = s * exp(m - m') + sum exp(x - m'). A running max of -inf (nothing seen
    yet, or only -inf entries) is replaced by 0 in the exponents so -inf - -inf never appears."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new).to(m.dtype)
    r = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    s_new = s * r + tl.sum(e, 0)
    return m_new, s_new, r, e


@triton.jit
def _lse_rows(m, s, x):
    """``_lse_update`` for each row of a tile ``x`` (R, BLOCK), running ``m``, ``s`` of shape (R,):
    the student (R = 1) or the teachers (R = MB)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new).to(m.dtype)
    r = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    s_new = s * r + tl.sum(e, 1)
    return m_new, s_new, r, e


@triton.jit
def _load_row(row_ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(row_ptr + offs, mask=mask, other=NEG_INF).to(ACC)


@triton.jit
def _load_teachers(v_rows, zp_row, offs, mask_t, mask_s, rho, omr, HAS_ZP: tl.constexpr,
                   ACC: tl.constexpr):
    """The teacher rows the loss sees, one per teacher slot (``v_rows``: (MB, 1) row pointers, or
    (MB,) with a scalar ``offs``): v_m, or r_m = (1 - rho) v_m + rho zp (retro_kd; the one zp row,
    read once, is mixed into every teacher). rho = 0 / 1 select v / zp exactly (no 0 * -inf).
    ``omr`` = 1 - rho to working precision."""
    v = tl.load(v_rows + offs, mask=mask_t, other=NEG_INF).to(ACC)
    if HAS_ZP:
        zp = tl.load(zp_row + offs, mask=mask_s, other=NEG_INF).to(ACC)
        mix = omr * v + rho * zp
        v = tl.where(rho == 0.0, v, tl.where(rho == 1.0, zp, mix))
    return v


@triton.jit
def _tmask(mask, tok2, MB: tl.constexpr):
    """The (MB, BLOCK) teacher mask: the row mask and the slot being a teacher (m < M); with one
    teacher slot just the row mask."""
    if MB == 1:
        out = mask
    else:
        out = mask & tok2
    return out


@triton.jit
def _tsum(x, tok2, MB: tl.constexpr):
    """Sum over the teachers of an (MB, BLOCK) tile -> (1, BLOCK), padding slots left out (their
    values are garbage: -inf rows). One teacher slot: the tile itself."""
    if MB == 1:
        out = x
    else:
        out = tl.sum(tl.where(tok2, x, 0.0), 0, keep_dims=True)
    return out


@triton.jit
def _finish(x, ignored, bad):
    """Ignored row -> 0, bad label -> NaN."""
    x = tl.where(ignored, 0.0, x)
    return tl.where(bad, float("nan"), x)


@triton.jit
def _safe(m):
    """A running max with -inf (nothing seen yet) replaced by 0, as in ``_lse_rows``' exponents."""
    return tl.where(m == NEG_INF, 0.0, m).to(m.dtype)


@triton.jit
def _ref(r, m):
    """The reference value d is taken against: ``r`` (the other stream's value at this stream's
    argmax), or the safe max ``m`` while there is none (-inf: nothing seen, or a -inf logit there,
    where d is then +inf exactly as against the max)."""
    return tl.where(r == NEG_INF, m, r).to(m.dtype)


@triton.jit
def _upd_ref(ref, bm, m_old, at):
    """Running "other stream's value at this stream's argmax": a block whose max ``bm`` beats the
    running max ``m_old`` replaces it, a tie keeps the larger (any fixed choice would do)."""
    return tl.where(bm > m_old, at, tl.where(bm == m_old, tl.maximum(ref, at), ref))


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0, accurate relative to its own size for tiny x (Goldberg: u = 1 + x,
    log1p(x) = log(u) * x / (u - 1), exact for the rounded u; ``tl.log`` is the accurate libdevice
    log, libdevice's log1p has no interpreter implementation). NaN for x = inf: callers select."""
    u = 1.0 + x
    den = u - 1.0
    return tl.where(den == 0.0, x, tl.log(u) * (x / tl.where(den == 0.0, 1.0, den)))


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _phi_small(x, ACC: tl.constexpr):
    """phi(x) = e^x - 1 - x = x^2 P(x), P(x) = sum_n x^n / (n + 2)!, for |x| <= 1 (Horner, n <= 9 in
    fp32, n <= 17 in fp64: truncation below half an ulp of P(-1) = 0.37)."""
    if ACC == tl.float64:
        r = x * 0.0 + 8.220635246624329e-18       # 1/19!
        r = r * x + 1.5619206968586225e-16        # 1/18!
        r = r * x + 2.8114572543455206e-15        # 1/17!
        r = r * x + 4.779477332387385e-14         # 1/16!
        r = r * x + 7.647163731819816e-13         # 1/15!
        r = r * x + 1.1470745597729725e-11        # 1/14!
        r = r * x + 1.6059043836821613e-10        # 1/13!
        r = r * x + 2.08767569878681e-09          # 1/12!
        r = r * x + 2.505210838544172e-08         # 1/11!
    else:
        r = x * 0.0 + 2.505210838544172e-08       # 1/11!
    r = r * x + 2.755731922398589e-07             # 1/10!
    r = r * x + 2.7557319223985893e-06            # 1/9!
    r = r * x + 2.48015873015873e-05              # 1/8!
    r = r * x + 0.0001984126984126984             # 1/7!
    r = r * x + 0.001388888888888889              # 1/6!
    r = r * x + 0.008333333333333333              # 1/5!
    r = r * x + 0.041666666666666664              # 1/4!
    r = r * x + 0.16666666666666666               # 1/3!
    r = r * x + 0.5                               # 1/2!
    return x * x * r


@triton.jit
def _phi_term(w, h, big, ACC: tl.constexpr):
    """w * phi(-h) >= 0 (docs/kernel-math.md, accurate loss), given ``big`` = w e^{-h} computed
    without forming e^{-h} (q E for the forward KL, m_j for JSD): the polynomial for |h| <= 1, else
    big - w + w h (at most ~4x cancellation there). w = 0 adds ``big`` (the partner distribution's
    mass where this one underflowed, needed for sum = e^KL - 1); lanes outside the row have
    w = big = 0 and h NaN: 0."""
    small = w * _phi_small(-h, ACC)
    large = big - w + tl.where(w > 0.0, w * h, 0.0)
    return tl.where(tl.abs(h) <= 1.0, small, large)


@triton.jit
def _two_diff(a, b):
    """(s, r) with s + r = a - b exactly (Knuth's TwoSum of a and -b)."""
    s = a - b
    bb = s - a
    return s, (a - (s - bb)) - (b + bb)


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
def _pick(x, sel):
    """Teacher slot ``sel`` ((MB,) one-hot mask) of a per-teacher vector x, as a (1,) vector."""
    return tl.sum(tl.where(sel, x, 0.0), 0, keep_dims=True)


@triton.jit
def _x_plan(kl1, dmag, la, lc, tok, C, NEED_GZ: tl.constexpr, NEED_GV: tl.constexpr):
    """How the KL-kind loss is finished (docs/kernel-math.md): the one-pass KL1 (dbar plus the
    reference's offset, minus lc - la) cancels when KL << dmag + la + lc (dmag: the size of dbar and
    of the offset); the accurate KL = log1p(X), X = sum p phi(-u) >= 0, is
    accumulated in the gradient sweep. Returns (use_x: take log1p(X) (per teacher), E = exp(KL1) for
    the |u| > 1 terms, the end of the X / gradient sweep). With gradients the sweep runs anyway and
    X is used whenever KL1 <= 1 (beyond, E could overflow and KL1 has nothing left to cancel);
    forward-only, the sweep runs (for the whole row, if any teacher needs it) only when KL1 would
    lose more than 6 bits."""
    use = kl1 <= 1.0
    if NEED_GZ or NEED_GV:
        end = C
    else:
        use = use & (kl1 <= 0.015625 * (dmag + tl.abs(la) + tl.abs(lc)))
        end = tl.where(tl.max((use & tok).to(tl.int32), 0) > 0, C, 0)
    return use, tl.exp(tl.minimum(kl1, 1.0)), end


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
        bad = ((y < 0) | (y >= C)) & (y != ignore_index)
        y = tl.where(ignored | bad, 0, y).to(tl.int32)  # in bounds from here on
    else:
        ignored = row < 0
        bad = row < 0
        y = (row * 0 - 1).to(tl.int32)  # matches no column
    live = (ignored | bad) == 0
    # the row's live extent: C, or 0 for an ignored / bad row (``offs < lim`` is then all false).
    # One comparison instead of ``(offs < C) & live`` (a block & scalar mask, which the 3.9
    # interpreter widens to int32 and then refuses as a load mask).
    lim = tl.where(live, C, 0)
    lim_m = tl.where(live, M, 0)         # likewise for the teacher slots of a per-row gather

    g = tl.load(gs_ptr).to(ACC)
    if MB == 1:
        wkd = tl.load(kdw_ptr + row + tm * stride_wm).to(ACC)
    else:
        wkd = tl.load(kdw_ptr + row + tm * stride_wm, mask=tok, other=0.0).to(ACC)
    wce = tl.load(cew_ptr + row).to(ACC)
    gk = g * wkd  # (MB,): factor of every distillation gradient, per teacher
    gc = g * wce  # factor of the CE gradient

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
    # Pass 1: statistics
    # ======================================================================================
    if KIND == KIND_LM:
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

    elif KIND == KIND_LS:
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

    else:
        # ---- KL, DKD, JSD: pass 1 = online lse of a = z/Ts and c = v/Tt (DKD: over j != y), and
        # for KL / DKD W = sum exp(c - m_c) d, d_j = (c_j - m_c) - (a_j - m_a) relative to the running
        # maxima, corrected when they move (reverse: weights exp(a - m_a), d^r = -d) ----
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, omr, HAS_ZP, ACC)
            a = z * its
            c = v * itt
            if KIND == KIND_DKD:
                nt = offs != y
                a = tl.where(nt, a, NEG_INF)
                c = tl.where(nt, c, NEG_INF)
            s_a0 = s_a
            s_c0 = s_c
            mas0 = _safe(m_a)
            mcs0 = _safe(m_c)
            # the teacher's value at the student's argmax (c_ref: reverse KL, JSD) and the
            # student's at the teacher's argmax (a_ref: forward KL, DKD, JSD), ties: the largest.
            # KL / DKD take d against them, so d = 0 exactly at the argmax of the weighting
            # distribution and u there (tiny in a saturated row) has no rounding of the row's size;
            # JSD chooses its gradient representation from them (below)
            cr0 = _ref(c_ref, mcs0)
            ar0 = _ref(a_ref, mas0)
            if KIND == KIND_JSD or REVERSE:
                bma = tl.max(a, 1)
                c_ref = _upd_ref(c_ref, bma, m_a, tl.max(tl.where(a == bma[:, None], c, NEG_INF), 1))
            if KIND == KIND_JSD or not REVERSE:
                bmc = tl.max(c, 1)
                a_ref = _upd_ref(a_ref, bmc, m_c, tl.max(tl.where(c == bmc[:, None], a, NEG_INF), 1))
            m_a, s_a, r_a, e_a = _lse_rows(m_a, s_a, a)
            m_c, s_c, r_c, e_c = _lse_rows(m_c, s_c, c)
            if KIND != KIND_JSD:
                mas = _safe(m_a)
                mcs = _safe(m_c)
                if REVERSE:
                    # d_j = (a_j - m_a) - (c_j - c_ref), weights exp(a - m_a), per teacher
                    cr = _ref(c_ref, mcs)
                    dd = (a - mas[:, None]) - (c - cr[:, None])
                    shift = (mas - mas0) - (cr - cr0)   # d_new = d_old - shift
                    w = r_a * (w - tl.where(s_a0 > 0.0, s_a0 * shift, 0.0)) \
                        + tl.sum(tl.where(e_a > 0.0, e_a * dd, 0.0), 1)
                else:
                    # d_j = (c_j - m_c) - (a_j - a_ref), weights exp(c - m_c)
                    ar = _ref(a_ref, mas)
                    dd = (c - mcs[:, None]) - (a - ar[:, None])
                    shift = (mcs - mcs0) - (ar - ar0)   # d_new = d_old - shift
                    w = r_c * (w - tl.where(s_c0 > 0.0, s_c0 * shift, 0.0)) \
                        + tl.sum(tl.where(e_c > 0.0, e_c * dd, 0.0), 1)
            if HAS_CE and not CE_SHARED:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
            if WTTM:
                m_u, s_u, _ru, _eu = _lse_rows(m_u, s_u, v)
        # maxima and log-sums kept apart (never lse = m + l as one float): log q_j = (a_j - m_a) - la
        mas = _safe(m_a)
        mcs = _safe(m_c)
        la = tl.log(s_a)
        lc = tl.log(s_c)
        m1s = _safe(m_1)
        l1 = tl.log(s_1)
        if CE_SHARED:
            m1s = mas
            l1 = la

        if KIND == KIND_KL:
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

        elif KIND == KIND_DKD:
            # Pass 1 gave the non-target statistics (m, l over j != y) and W over j != y: NCKD is the
            # KL kind over j != y. The target: t_p = logit p_y = log p_y - log(1 - p_y)
            # = (c_y - m_c) - lc, t_q likewise; p_y, 1 - p_y as sigmoids of t_p (no cancellation).
            # Student quantities (1,), teacher quantities (MB,): TCKD_m, NCKD_m, G_m per teacher.
            zy = tl.load(z_row + y, mask=live, other=0.0).to(ACC)
            ay = zy * its
            cy = _load_teachers(v_base, zp_row, y, tm < lim_m, live, rho, omr, HAS_ZP, ACC) * itt
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
            nckd = tl.where(use_x, _log1p(xs), kl1)
            D = ts * ts * (alpha * tckd + beta * nckd)

        else:  # KIND_JSD, T = ts = tt, 0 < beta < 1
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
            nlb = -tl.log(beta)
            nl1b = -tl.log(omb)
            lbr = nl1b - nlb                  # log(beta / (1 - beta))
            lcla = lc - la                    # eps_j = (dc_j - da_j) - lcla
            hi_b = beta > 0.5                 # near-equal elements: log1p of the smaller side
            wb = tl.where(hi_b, omb, beta)
            sg = tl.where(hi_b, -1.0, 1.0)
            cq = tl.where(hi_b, 1.0, 0.0)
            fq = _softplus(((c_ref - mcs) - lcla) + lbr) < 0.5 * nl1b
            fp = _softplus(((a_ref - mas) + lcla) - lbr) < 0.5 * nlb
            bq = zt
            bp = zt
            jl = zt
            # Pass 2: Bq, Bp; the loss here without gradients or with several teachers (one
            # teacher: in the gradient sweep, which has the registers to spare in half blocks; the
            # gradient sweep of several teachers carries the student gradient across them).
            # Several teachers: one teacher row at a time, as in the gradient sweep below.
            for start in range(0, C, BLOCK):
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
            if HAS_CE:
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
            D = jl

    # D_m unweighted per teacher (d_out is (M, N)); CE once
    if MB == 1:
        tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad))
    else:
        tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad), mask=tok)
    if HAS_CE:
        tl.store(ce_ptr + row, tl.sum(_finish(ce, ignored, bad), 0))
    else:
        tl.store(ce_ptr + row, tl.sum(zs, 0))
