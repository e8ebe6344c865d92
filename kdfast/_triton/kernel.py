"""The fused distillation row kernel (one Triton kernel family, constexpr flags per loss kind).

One program per row. The row is swept in ``BLOCK``-column chunks: pass 1 gathers the row statistics
(online log-sum-exp with a block-level max: one rescale ``exp`` per block and statistic), pass 2
(and pass 3 for LS / JSD) computes the loss terms and writes the gradients once, in the input
dtype, with ``grad_scale * weight`` folded in. The math is docs/kernel-math.md; each gradient line
below restates the formula it implements.

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
def _load_teachers(v_rows, zp_row, offs, mask_t, mask_s, rho, HAS_ZP: tl.constexpr, ACC: tl.constexpr):
    """The teacher rows the loss sees, one per teacher slot (``v_rows``: (MB, 1) row pointers, or
    (MB,) with a scalar ``offs``): v_m, or r_m = (1 - rho) v_m + rho zp (retro_kd; the one zp row,
    read once, is mixed into every teacher). rho = 0 / 1 select v / zp exactly (no 0 * -inf)."""
    v = tl.load(v_rows + offs, mask=mask_t, other=NEG_INF).to(ACC)
    if HAS_ZP:
        zp = tl.load(zp_row + offs, mask=mask_s, other=NEG_INF).to(ACC)
        mix = (1.0 - rho) * v + rho * zp
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
    w = zt               # KL: sum exp(c - m_c)(c - a)  (reverse: sum exp(a - m_a)(a - c))
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
        # d_j = z_j - v_j; dbar = mean(d) (center) or 0   (per teacher: dbar_m = mean(z - v_m))
        dsum = zt
        if CENTER or (HAS_CE and not CE_SHARED):
            for start in range(0, C, BLOCK):
                offs = start + cols
                mask = offs < lim
                z = _load_row(z_row, offs, mask, ACC)
                if CENTER:
                    v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho,
                                       HAS_ZP, ACC)
                    dsum += tl.sum(tl.where(mask, z - v, 0.0), 1)
                if HAS_CE:
                    m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
        dbar = dsum / Cf
        sq = zt
        # Pass 2: D = (1/2C) sum (d_j - dbar)^2 (two-pass form, no cancellation);
        # dD/dz_j = (d_j - dbar)/C, dD/dv_j = -(d_j - dbar)/C (times (1 - rho) for retro).
        # Multi: dL/dz_j = sum_m kd_w[m] (z_j - v_mj - dbar_m)/C; dL/dv_mj = -kd_w[m] (...)/C.
        if HAS_CE:
            # CE = lse(z) - z_y, read before the sweep below overwrites z when grad_z aliases it
            L1 = m_1 + tl.log(s_1)
            ce = L1 - tl.load(z_row + y, mask=live, other=0.0).to(ACC)
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb = offs < C
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP, ACC)
            e = tl.where(mask, (z - v) - dbar[:, None], 0.0)
            sq += tl.sum(e * e, 1)
            if NEED_GZ:
                gz = _tsum((gk / Cf)[:, None] * e, tok2, MB)
                if HAS_CE:
                    # dCE/dz_j = softmax(z)_j - [j = y]
                    gz += gc * (tl.exp(z - L1[:, None]) - (offs == y).to(ACC))
                gz = _finish(gz, ignored, bad)
                tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
            if NEED_GV:
                gv = (-gk / Cf)[:, None] * e
                if HAS_ZP:
                    gv = gv * (1.0 - rho)
                gv = _finish(gv, ignored, bad)
                tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty), mask=_tmask(inb, tok2, MB))
        D = sq / (2.0 * Cf)

    elif KIND == KIND_LS:
        # ---- pass 1: mean and M2 of z and of each v_m, Chan's block-wise combination (no
        # cancellation); the student's once, each teacher's in its slot ----
        n = zs
        mz = zs
        Mz = zs
        mv = zt
        Mv = zt
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP, ACC)
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
            if HAS_CE:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
        sig_z = tl.sqrt(Mz / (Cf - 1.0))
        sig_v = tl.sqrt(Mv / (Cf - 1.0))
        kz = 1e-7 + sig_z
        kv = 1e-7 + sig_v
        ikz = 1.0 / kz
        ikv = 1.0 / kv
        # ---- pass 2: KL statistics on z' = (z - zbar)/kz, v' likewise, at T = ts, plus the sums
        # for the chain through mean and s: sum e_a u, sum e_c u (student), sum e_c (c - a) u^v,
        # sum e_c u^v (teacher). sum e_a u once; the others per teacher.
        qu = zs
        pu = zt
        pwu = zt
        pvu = zt
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP, ACC)
            uz = tl.where(mask, z - mz[:, None], 0.0)
            uv = tl.where(mask, v - mv[:, None], 0.0)
            a = tl.where(mask, uz * (ikz * its)[:, None], NEG_INF)
            c = tl.where(mask, uv * (ikv * its)[:, None], NEG_INF)
            m_a, s_a, r_a, e_a = _lse_rows(m_a, s_a, a)
            m_c, s_c, r_c, e_c = _lse_rows(m_c, s_c, c)
            cma = tl.where(mask, c - a, 0.0)
            w = w * r_c + tl.sum(e_c * cma, 1)
            if NEED_GZ:
                qu = qu * r_a + tl.sum(e_a * uz, 1)
                pu = pu * r_c + tl.sum(e_c * uz, 1)
            if NEED_GV:
                pwu = pwu * r_c + tl.sum(e_c * cma * uv, 1)
                pvu = pvu * r_c + tl.sum(e_c * uv, 1)
        Lz = m_a + tl.log(s_a)
        Lv = m_c + tl.log(s_c)
        kl = w / s_c - Lv + Lz
        D = ts * ts * kl
        if HAS_CE:
            L1 = m_1 + tl.log(s_1)
            ce = L1 - tl.load(z_row + y, mask=live, other=0.0).to(ACC)
        # gamma_j = dD/dz'_j = T (q_j - p_j);  sum_k gamma_k u_k = T (sum q u - sum p u)
        sgu_z = ts * (qu / s_a - pu / s_c)
        # gamma^v_j = T p_j (log p_j - log q_j - KL), log p - log q = c - a - Lv + Lz:
        # sum_k gamma^v_k u^v_k = T (sum p (c - a) u^v + (Lz - Lv - KL) sum p u^v)
        sgu_v = ts * (pwu / s_c + (Lz - Lv - kl) * (pvu / s_c))
        # ---- pass 3: dD/dz_j = gamma_j / k - (sum gamma u) u_j / (k^2 (C-1) sigma)
        # Multi: dL/dz_j = sum_m kd_w[m] (gamma_mj / k - (sum gamma_m u) u_j / (k^2 (C-1) sigma)):
        # k, sigma, u of the student shared, gamma_m and its sum per teacher.
        cz = sgu_z / (kz * kz * (Cf - 1.0) * sig_z)
        cv = sgu_v / (kv * kv * (Cf - 1.0) * sig_v)
        if NEED_GZ or NEED_GV:
            for start in range(0, C, BLOCK):
                offs = start + cols
                inb = offs < C
                mask = offs < lim
                z = _load_row(z_row, offs, mask, ACC)
                v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP,
                                   ACC)
                uz = tl.where(mask, z - mz[:, None], 0.0)
                uv = tl.where(mask, v - mv[:, None], 0.0)
                a = uz * (ikz * its)[:, None]
                c = uv * (ikv * its)[:, None]
                q = tl.where(mask, tl.exp(a - Lz[:, None]), 0.0)
                p = tl.where(mask, tl.exp(c - Lv[:, None]), 0.0)
                if NEED_GZ:
                    gam = ts * (q - p)
                    gz = _tsum(gk[:, None] * (gam * ikz[:, None] - cz[:, None] * uz), tok2, MB)
                    if HAS_CE:
                        gz += gc * (tl.exp(z - L1[:, None]) - (offs == y).to(ACC))
                    gz = _finish(gz, ignored, bad)
                    tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
                if NEED_GV:
                    gam_v = ts * p * ((c - a) - Lv[:, None] + Lz[:, None] - kl[:, None])
                    gv = gk[:, None] * (gam_v * ikv[:, None] - cv[:, None] * uv)
                    if HAS_ZP:
                        gv = gv * (1.0 - rho)
                    gv = _finish(gv, ignored, bad)
                    tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                             mask=_tmask(inb, tok2, MB))

    else:
        # ---- KL, DKD, JSD: pass 1 = online lse of a = z/Ts and c = v/Tt (DKD: over j != y), W ----
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < lim
            z = _load_row(z_row, offs, mask, ACC)
            v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP, ACC)
            a = z * its
            c = v * itt
            if KIND == KIND_DKD:
                nt = offs != y
                a = tl.where(nt, a, NEG_INF)
                c = tl.where(nt, c, NEG_INF)
            m_a, s_a, r_a, e_a = _lse_rows(m_a, s_a, a)
            m_c, s_c, r_c, e_c = _lse_rows(m_c, s_c, c)
            if KIND != KIND_JSD:
                if REVERSE:
                    # per teacher, rescaled with the student's running max
                    w = w * r_a + tl.sum(tl.where(e_a > 0.0, e_a * (a - c), 0.0), 1)
                else:
                    w = w * r_c + tl.sum(tl.where(e_c > 0.0, e_c * (c - a), 0.0), 1)
            if HAS_CE and not CE_SHARED:
                m_1, s_1, _r1, _e1 = _lse_rows(m_1, s_1, z)
            if WTTM:
                m_u, s_u, _ru, _eu = _lse_rows(m_u, s_u, v)
        Lz = m_a + tl.log(s_a)
        Lv = m_c + tl.log(s_c)
        if HAS_CE and not CE_SHARED:
            L1 = m_1 + tl.log(s_1)

        if KIND == KIND_KL:
            # KL = sum p (c - a) - Lv + Lz = W / S_v - Lv + Lz   (reverse: W / S_a - Lz + Lv)
            if REVERSE:
                kl = w / s_a - Lz + Lv
            else:
                kl = w / s_c - Lv + Lz
            if WTTM:
                sf = tl.exp(Lv - (m_u + tl.log(s_u)) * itt)  # U = exp(lse(v/T) - lse(v)/T), no grad
            else:
                sf = scale
            D = sf * kl
            if HAS_CE:
                if CE_SHARED:
                    L1 = Lz
                ce = L1 - tl.load(z_row + y, mask=live, other=0.0).to(ACC)
            if NEED_GZ or NEED_GV:
                # per teacher: kd_w[m] * s_m / Ts (s_m = U_m for wttm), and / Tt for the teacher
                cz = (gk * sf * its)[:, None]
                cv = (gk * sf * itt)[:, None]
                if HAS_ZP:
                    cv = cv * (1.0 - rho)
                for start in range(0, C, BLOCK):
                    offs = start + cols
                    inb = offs < C
                    mask = offs < lim
                    z = _load_row(z_row, offs, mask, ACC)
                    v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho,
                                       HAS_ZP, ACC)
                    logq = z * its - Lz[:, None]
                    logp = v * itt - Lv[:, None]
                    q = tl.exp(logq)
                    p = tl.exp(logp)
                    if NEED_GZ:
                        if REVERSE:
                            # dD/dz_j = (s/Ts) q_j (log q_j - log p_j - KL)
                            # multi: sum_m kd_w[m] (s/Ts) q_j (log q_j - log p_mj - KL_m)
                            gz = _tsum(cz * tl.where(q > 0.0, q * (logq - logp - kl[:, None]), 0.0),
                                       tok2, MB)
                        else:
                            # dD/dz_j = (s/Ts) (q_j - p_j);  multi: sum_m kd_w[m] (s_m/Ts) (q_j - p_mj)
                            gz = _tsum(cz * (q - p), tok2, MB)
                        if HAS_CE:
                            # dCE/dz_j = softmax(z)_j - [j = y]
                            if CE_SHARED:
                                q1 = q
                            else:
                                q1 = tl.exp(z - L1[:, None])
                            gz += gc * (q1 - (offs == y).to(ACC))
                        gz = _finish(gz, ignored, bad)
                        tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
                    if NEED_GV:
                        if REVERSE:
                            # dD/dv_j = (s/Tt) (p_j - q_j)
                            gv = cv * (p - q)
                        else:
                            # dD/dv_j = (s/Tt) p_j (log p_j - log q_j - KL), 0 where p_j = 0
                            gv = cv * tl.where(p > 0.0, p * (logp - logq - kl[:, None]), 0.0)
                        gv = _finish(gv, ignored, bad)
                        tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                                 mask=_tmask(inb, tok2, MB))

        elif KIND == KIND_DKD:
            # Lz\y, Lv\y from pass 1; the full lse by adding the target term (no log(1 - q_y)).
            # Student quantities (1,), teacher quantities (MB,): TCKD_m, NCKD_m, G_m per teacher.
            Lzn = Lz
            Lvn = Lv
            zy = tl.load(z_row + y, mask=live, other=0.0).to(ACC)
            ay = zy * its
            cy = _load_teachers(v_base, zp_row, y, tm < lim_m, live, rho, HAS_ZP, ACC) * itt
            mz_ = tl.maximum(Lzn, ay)
            Lzf = mz_ + tl.log(tl.exp(Lzn - mz_) + tl.exp(ay - mz_))
            mv_ = tl.maximum(Lvn, cy)
            Lvf = mv_ + tl.log(tl.exp(Lvn - mv_) + tl.exp(cy - mv_))
            logqy = ay - Lzf
            log1mq = Lzn - Lzf
            logpy = cy - Lvf
            log1mp = Lvn - Lvf
            qy = tl.exp(logqy)
            py = tl.exp(logpy)
            omp = tl.exp(log1mp)  # 1 - p_y without cancellation
            # TCKD = p_y (log p_y - log q_y) + (1 - p_y)(log(1 - p_y) - log(1 - q_y))
            tckd = tl.where(py > 0.0, py * (logpy - logqy), 0.0) \
                + tl.where(omp > 0.0, omp * (log1mp - log1mq), 0.0)
            # NCKD = sum_{j != y} p^_j (log p^_j - log q^_j) = W / S_v\y - Lv\y + Lz\y
            nckd = w / s_c - Lvn + Lzn
            D = ts * ts * (alpha * tckd + beta * nckd)
            if HAS_CE:
                if CE_SHARED:
                    L1 = Lzf
                ce = L1 - zy
            # G = log(p_y/q_y) - log((1-p_y)/(1-q_y)); G p_y (1 - p_y) -> 0 as p_y -> 0 or 1
            G = (logpy - logqy) - (log1mp - log1mq)
            Gp = tl.where((py > 0.0) & (omp > 0.0), alpha * G * py, 0.0)
            if NEED_GZ or NEED_GV:
                gkt = (gk * ts)[:, None]
                gty = (alpha * (qy - py))[:, None]    # per teacher: alpha (q_y - p_my)
                gtn = (alpha * (py - qy))[:, None]
                tcv = (Gp * omp)[:, None]
                for start in range(0, C, BLOCK):
                    offs = start + cols
                    inb = offs < C
                    mask = offs < lim
                    z = _load_row(z_row, offs, mask, ACC)
                    v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho,
                                       HAS_ZP, ACC)
                    tgt = offs == y
                    a = z * its
                    c = v * itt
                    logqh = a - Lzn[:, None]
                    logph = c - Lvn[:, None]
                    qh = tl.where(tgt, 0.0, tl.exp(logqh))
                    ph = tl.where(tgt, 0.0, tl.exp(logph))
                    if NEED_GZ:
                        # j = y : dD/dz_j = T alpha (q_y - p_y)
                        # j != y: dD/dz_j = T (alpha (q_j - (1 - p_y) q^_j) + beta (q^_j - p^_j))
                        #                 = T (alpha (p_y - q_y) q^_j + beta (q^_j - p^_j))   (q_j = (1-q_y) q^_j)
                        # multi: sum_m kd_w[m] T (...)_m, p_y, p^ of teacher m
                        gkd = tl.where(tgt, gty, gtn * qh + beta * (qh - ph))
                        gz = _tsum(gkt * gkd, tok2, MB)
                        if HAS_CE:
                            if CE_SHARED:
                                q1 = tl.exp(a - Lzf[:, None])
                            else:
                                q1 = tl.exp(z - L1[:, None])
                            gz += gc * (q1 - tgt.to(ACC))
                        gz = _finish(gz, ignored, bad)
                        tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
                    if NEED_GV:
                        # dD/dv_j = T alpha G p_y ([j = y] - p_j) + T beta [j != y] p^_j (log p^_j - log q^_j - NCKD)
                        # with p_j = (1 - p_y) p^_j (j != y), 1 - p_y at j = y
                        tc = tl.where(tgt, tcv, -tcv * ph)
                        nc = tl.where(ph > 0.0, ph * (logph - logqh - nckd[:, None]), 0.0)
                        gv = gkt * (tc + beta * nc)
                        if HAS_ZP:
                            gv = gv * (1.0 - rho)
                        gv = _finish(gv, ignored, bad)
                        tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                                 mask=_tmask(inb, tok2, MB))

        else:  # KIND_JSD, T = ts = tt, 0 < beta < 1
            # pass 2: KLp = KL(p || m), KLq = KL(q || m), m = beta p + (1 - beta) q
            # (per teacher: m_m = beta p_m + (1 - beta) q, so KLq_m depends on the teacher too)
            klp = zt
            klq = zt
            for start in range(0, C, BLOCK):
                offs = start + cols
                mask = offs < lim
                z = _load_row(z_row, offs, mask, ACC)
                v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho, HAS_ZP, ACC)
                logq = z * its - Lz[:, None]
                logp = v * itt - Lv[:, None]
                q = tl.exp(logq)
                p = tl.exp(logp)
                logm = tl.log(beta * p + (1.0 - beta) * q)
                klp += tl.sum(tl.where(p > 0.0, p * (logp - logm), 0.0), 1)
                klq += tl.sum(tl.where(q > 0.0, q * (logq - logm), 0.0), 1)
            D = beta * klp + (1.0 - beta) * klq
            if HAS_CE:
                if CE_SHARED:
                    L1 = Lz
                ce = L1 - tl.load(z_row + y, mask=live, other=0.0).to(ACC)
            if NEED_GZ or NEED_GV:
                cz = (gk * its * (1.0 - beta))[:, None]
                cv = (gk * itt * beta)[:, None]
                if HAS_ZP:
                    cv = cv * (1.0 - rho)
                for start in range(0, C, BLOCK):
                    offs = start + cols
                    inb = offs < C
                    mask = offs < lim
                    z = _load_row(z_row, offs, mask, ACC)
                    v = _load_teachers(v_rows, zp_row, offs, _tmask(mask, tok2, MB), mask, rho,
                                       HAS_ZP, ACC)
                    logq = z * its - Lz[:, None]
                    logp = v * itt - Lv[:, None]
                    q = tl.exp(logq)
                    p = tl.exp(logp)
                    logm = tl.log(beta * p + (1.0 - beta) * q)
                    if NEED_GZ:
                        # dD/dz_j = (1/T)(1 - beta) q_j (log q_j - log m_j - KLq)
                        # multi: sum_m kd_w[m] (1/T)(1 - beta) q_j (log q_j - log m_mj - KLq_m)
                        gz = _tsum(cz * tl.where(q > 0.0, q * (logq - logm - klq[:, None]), 0.0),
                                   tok2, MB)
                        if HAS_CE:
                            if CE_SHARED:
                                q1 = q
                            else:
                                q1 = tl.exp(z - L1[:, None])
                            gz += gc * (q1 - (offs == y).to(ACC))
                        gz = _finish(gz, ignored, bad)
                        tl.store(gz_ptr + row * stride_gz + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)
                    if NEED_GV:
                        # dD/dv_j = (1/T) beta p_j (log p_j - log m_j - KLp)
                        gv = cv * tl.where(p > 0.0, p * (logp - logm - klp[:, None]), 0.0)
                        gv = _finish(gv, ignored, bad)
                        tl.store(gv_rows + offs, gv.to(gv_ptr.dtype.element_ty),
                                 mask=_tmask(inb, tok2, MB))

    # D_m unweighted per teacher (d_out is (M, N)); CE once
    if MB == 1:
        tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad))
    else:
        tl.store(d_ptr + row + tm * stride_wm, _finish(D, ignored, bad), mask=tok)
    if HAS_CE:
        tl.store(ce_ptr + row, tl.sum(_finish(ce, ignored, bad), 0))
    else:
        tl.store(ce_ptr + row, tl.sum(zs, 0))
