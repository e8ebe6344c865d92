"""Shared primitives of the Triton distillation kernel (kdfast/_triton/kernel.py) and of the top-k
kernel: the kind constants (== kdfast._spec.Kind), online log-sum-exp, row / teacher loads and masks,
the per-teacher reductions, the row finish (0 / NaN for ignored / bad rows), the arg-max references,
log1p / softplus / phi, the KL loss plan ``_x_plan``, and ``softmax_stats``, pass 1 of the softmax
kinds (KL, DKD, JSD), with ``stats_end`` (its row constants, shared with the KL kind's phase 2). Each kind's own passes live in its module (kl.py, dkd.py, logit_matching.py,
ls.py, jsd.py, topk.py).
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
def softmax_stats(
        C, tok2, z_row, v_rows, zp_row, cols, rho, omr, its, itt, y, lim, m_a, s_a, m_c, s_c, w,
        c_ref, a_ref, m_1, s_1, m_u, s_u, KIND: tl.constexpr, HAS_CE: tl.constexpr,
        CE_SHARED: tl.constexpr, WTTM: tl.constexpr, REVERSE: tl.constexpr, HAS_ZP: tl.constexpr,
        ACC: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr, CE_NOT_Y: tl.constexpr = False,
):
    """Pass 1 of the softmax kinds (KL, DKD, JSD): the online lse of a = z / Ts and of
    c = v / Tt per teacher (DKD: over j != y), the arg-max references a_ref / c_ref, for KL / DKD
    W = sum exp(c - m_c) d (reverse: exp(a - m_a), d^r = -d), CE's lse(z) at T = 1 when not shared
    and wttm's lse(v). Returns the maxima and log-sums kept apart (``mas``, ``la``, ...) and the
    updated statistics (the raw CE pair ``m_1``, ``s_1`` last: the KL kind's phase 1 stores it).
    ``CE_NOT_Y`` (DKD's phase 1): CE's own pair over j != y as well (the label column is added back
    from the combined label logit in phase 2, as the C++ kernel's layout has it)."""
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
            if CE_NOT_Y:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, tl.where(offs != y, z, NEG_INF))
            else:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
        if WTTM:
            m_u, s_u, _ru, _eu = _lse_rows(m_u, s_u, v)
    mas, mcs, la, lc, m1s, l1 = stats_end(m_a, s_a, m_c, s_c, m_1, s_1, CE_SHARED)

    return mas, mcs, la, lc, m1s, l1, c_ref, a_ref, s_a, s_c, w, m_u, s_u, m_1, s_1


@triton.jit
def stats_end(m_a, s_a, m_c, s_c, m_1, s_1, CE_SHARED: tl.constexpr):
    """The row constants from pass 1's (max, sum) pairs (a row's own, or the ranks' combined: the
    KL kind's phase 2): maxima and log-sums kept apart (never lse = m + l as one float),
    log q_j = (a_j - m_a) - la."""
    mas = _safe(m_a)
    mcs = _safe(m_c)
    la = tl.log(s_a)
    lc = tl.log(s_c)
    m1s = _safe(m_1)
    l1 = tl.log(s_1)
    if CE_SHARED:
        m1s = mas
        l1 = la
    return mas, mcs, la, lc, m1s, l1
