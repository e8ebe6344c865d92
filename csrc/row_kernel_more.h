// The other loss kinds of the row kernel: DKD, LM, LS, JSD. Included by row_kernel.h inside the ISA
// namespace, after the shared machinery (sweep, Lse, Row, RowInfo) and the KL kind. Formulas and their
// derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

// Add `x` to lane `y - j0` of a block's vectors when column y lies in [j0, j0 + B): the `- [j = y]` of
// the CE gradient. One scalar test per block; the store / reload happens in one block per row.
template <class A>
inline void add_at(Vec<A>* g, int64_t j0, int64_t y, A x) {
  constexpr int W = Vec<A>::size();
  if (y < j0 || y >= j0 + int64_t(kBlock) * W) return;
  alignas(64) A buf[kBlock * W];
  for (int k = 0; k < kBlock; ++k) g[k].store(buf + k * W);
  buf[y - j0] += x;
  for (int k = 0; k < kBlock; ++k) g[k] = Vec<A>::loadu(buf + k * W);
}

// Zero the padding lanes of a special block (z = v = -inf there), for sums of plain values.
template <class A, class S>
inline Vec<A> live_only(S, const Block<A>& b, int k, const Vec<A>& x) {
  if constexpr (S::value) return Vec<A>::blendv(Vec<A>(A(0)), x, b.live[k]);
  else return x;
}

inline double finite_or(double x, double fallback) { return std::isfinite(x) ? x : fallback; }
inline double clamp_finite(double x) {
  return std::isnan(x) ? x : std::min(std::max(x, -1e300), 1e300);
}

// ===================================================================================================
// DKD: D = T^2 (alpha TCKD + beta NCKD), T = Ts = Tt, split at the label y (labels required, C >= 2).
// Pass 1 runs over j != y (sweep masks column y to -inf): Lz\y, Lv\y and the one-pass NCKD statistic
// W = sum_{j != y} exp(c_j - m_v)(c_j - a_j); the label column is added back in double.
// ===================================================================================================
template <int MT, class A, class TZ, class TV>
RowOut row_dkd(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri) {
  const double T = P.ts;
  const InvT<A> iT(T);
  const int64_t y = ri.y;
  const bool ce_sep = ri.ce && T != 1.0;
  Lse<A> Sz, S1, Sv[kCap<MT>];
  Vec<A> W[kCap<MT>], R[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) W[t] = R[t] = Vec<A>(A(0));
  // W = sum_{j != y} exp(c_j - m_v) d_j, d_j = (c_j - m_v) - (a_j - R), R the student's value at the
  // teacher's lane max, as in the KL kind (shifted when the lane maxima and references move)
  sweep<A>(r, y, false, [&](auto, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> a[kBlock], c[kBlock], e[kBlock];
    for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
    Sz.update(a, e);
    if (ce_sep) S1.update(b.z, e);
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) c[k] = vscale(v[k], iT);
      const Vec<A> mv0 = Sv[t].m, sv0 = Sv[t].s;
      const Vec<A> rv = Sv[t].update(c, e);
      const Vec<A> R1 = track_ref(R[t], c, a, Sv[t].m);
      Vec<A> w = shift_w(W[t], rv, sv0, Sv[t].m - mv0, R1 - R[t]);
      for (int k = 0; k < kBlock; ++k)
        w = vec::fmadd(e[k], finite_floor(c[k] - Sv[t].m) - finite_floor(a[k] - R1), w);
      W[t] = w, R[t] = R1;
    }
  });
  const LseTotal tz = total(Sz);  // over j != y
  const double lzn = tz.l(), Lzn = tz.lse();
  const double ay = scaled(ri.zy, iT);
  const double Lz = logaddexp(Lzn, ay);
  const double lqy = ay - Lz, l1qy = Lzn - Lz, qy = std::exp(lqy), qy1 = std::exp(l1qy);
  // CE's lse(z) at T = 1: its own stream (over j != y) or the student's (T == 1), plus the label column
  LseTotal t1{0.0, 1.0};
  if (ri.ce) {
    const LseTotal s1 = ce_sep ? total(S1) : tz;
    const double M = std::max(s1.M, ri.zy);
    t1 = {M, s1.S * std::exp(s1.M - M) + std::exp(ri.zy - M)};
  }
  RowOut out;
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  // per teacher: Lv\y (max and log S), the reference Rr (a at the teacher's argmax over j != y), dbar,
  // NCKD1 = dbar + (M_z\y - Rr) - (l_v\y - l_z\y), p_y, 1 - p_y, G p_y
  double Mvn[kCap<MT>] = {}, lvn[kCap<MT>] = {}, Rr[kCap<MT>] = {}, dbar[kCap<MT>] = {}, NCKD1[kCap<MT>] = {};
  double py[kCap<MT>] = {}, py1[kCap<MT>] = {}, Gp[kCap<MT>] = {}, TCKD[kCap<MT>] = {};
  bool refine = false, rf[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const LseTotal tv = total(Sv[t]);
    Mvn[t] = tv.M, lvn[t] = tv.l();
    const double Lvn = tv.lse();
    const double cy = scaled(ri.vy[t], iT);
    const double Lv = logaddexp(Lvn, cy);
    // NCKD = KL(p_hat || q_hat) over j != y (0 if the teacher has no non-target mass)
    if (tv.S > 0) {
      Rr[t] = at_row_max(Sv[t], tv, R[t]);
      dbar[t] = shifted_sum(W[t], Sv[t].s, Sv[t], tv, R[t], Rr[t]) / tv.S;
      const double off = (tz.M - Rr[t]) - (lvn[t] - lzn);
      NCKD1[t] = dbar[t] + off;
      rf[t] = needs_refine(NCKD1[t], std::abs(dbar[t]) + 1.0);
      refine |= rf[t];
    }
    const double lpy = cy - Lv, l1py = Lvn - Lv;  // log p_y, log(1 - p_y)
    py[t] = std::exp(lpy), py1[t] = std::exp(l1py);
    // TCKD, the binary KL of (p_y, 1 - p_y) || (q_y, 1 - q_y) with log ratios rr, rs: its mean form
    // tb = p_y rr + (1 - p_y) rs cancels when p_y ~ q_y; log1p of the phi terms does not (see "KL")
    const double rr = lpy - lqy, rs = l1py - l1qy;
    const double tb = (py[t] > 0 ? py[t] * rr : 0.0) + (py1[t] > 0 ? py1[t] * rs : 0.0);
    const double X = (py[t] > 0 ? wphi(lpy, py[t], tb - rr) : 0.0) + (py1[t] > 0 ? wphi(l1py, py1[t], tb - rs) : 0.0);
    // (a bucket without teacher mass leaves one term: tb itself, no cancellation; the phi form would
    // need that bucket's q e^KL term)
    TCKD[t] = py[t] > 0 && py1[t] > 0 && std::isfinite(tb) && std::abs(tb) < 1.0 ? std::log1p(X) : tb;
    out.D[t] = T * T * (P.alpha * TCKD[t] + P.beta * NCKD1[t]);
    Gp[t] = clamp_finite(py[t] > 0 ? (rr - rs) * py[t] : 0.0);
  }
  const bool grads = r.gz || r.gv[0];
  if (!grads && !refine) return out;

  // Gradients (s = T^2, da/dz = 1/T: a factor T overall). With q_hat_j = exp((a_j - M_z\y) - l_z\y),
  // q_j = q_hat_j (1 - q_y), and TCKD = const - p_y a_y - (1 - p_y) Lz\y + Lz in a:
  //   dD/dz_j = T g (alpha (q_j - (1 - p_y) q_hat_j) + beta (q_hat_j - p_hat_j))              j != y
  //           = q_hat_j * T g alpha (p_y - q_y) + T g beta (q_hat_j - p_hat_j)
  //   (the difference q_hat - p_hat taken first, as in row_kl)
  //   dD/dz_y = T g alpha (q_y - p_y)
  // In c, TCKD's gradient is G p_y ([j = y] - p_j), G = log(p_y/q_y) - log((1-p_y)/(1-q_y)), and
  // NCKD's is the KL-kind teacher gradient over j != y, p_hat_j u_j (u_j = d_j - dbar, see row_kl);
  // with p_j = p_hat_j (1 - p_y):
  //   dD/dv_j = p_hat_j * (T g beta u_j - T g alpha G p_y (1 - p_y))                          j != y
  //   dD/dv_y = T g alpha G p_y (1 - p_y)
  // plus CE: g_ce (softmax(z)_j - [j = y]); softmax(z)_j = q_j = q_hat_j (1 - q_y) when T == 1.
  // M teachers: dz sums the q_hat coefficients (Aq) and each teacher's (q_hat - p_hat) term.
  // NCKD = log1p(sum_{j != y} p_hat_j phi(-u_j)) (refine), accurate relative to its own size.
  double Aqs = ri.ce && !ce_sep ? ri.g_ce * qy1 : 0.0;
  A Ap[kCap<MT>] = {}, Bv1[kCap<MT>] = {}, Bv0[kCap<MT>] = {}, nMvn[kCap<MT>] = {}, nlvn[kCap<MT>] = {};
  A ndbar[kCap<MT>] = {}, E[kCap<MT>] = {}, nR[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double Tg = T * ri.g_kd[t], Tgv = Tg * r.w_v;
    nR[t] = A(-Rr[t]);
    Aqs += Tg * P.alpha * (py[t] - qy);
    Ap[t] = A(Tg * P.beta);
    Bv1[t] = A(Tgv * P.beta);
    Bv0[t] = A(-Tgv * P.alpha * Gp[t] * py1[t]);
    nMvn[t] = A(-Mvn[t]);
    nlvn[t] = A(-lvn[t]);
    ndbar[t] = A(-dbar[t]);
    E[t] = A(rf[t] ? std::exp(NCKD1[t]) : 0.0);
  }
  const A Aq = A(Aqs);
  const A B1 = A(ce_sep ? ri.g_ce : 0.0);
  const A nMzn = A(-tz.M), nlzn = A(-lzn), nM1 = A(-t1.M), nl1 = A(-t1.l());
  LongSum<A> X[kCap<MT>];
  sweep<A>(r, y, grads, [&](auto, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    Vec<A> qh[kBlock], a[kBlock];
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        if (t == 0) {  // the student's terms, once
          a[k] = vscale(b.z[k], iT);
          qh[k] = vexp((a[k] + Vec<A>(nMzn)) + Vec<A>(nlzn));
          Vec<A> gz = qh[k] * Vec<A>(Aq);
          if (ce_sep) gz = vec::fmadd(vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)), Vec<A>(B1), gz);
          b.gz[k] = gz;
        }
        const Vec<A> xc = vscale(v[k], iT) + Vec<A>(nMvn[t]);
        const Vec<A> ph = vexp(xc + Vec<A>(nlvn[t]));
        const Vec<A> u = (finite_floor(xc) - finite_floor(a[k] + Vec<A>(nR[t]))) + Vec<A>(ndbar[t]);
        b.gz[k] = vec::fmadd(qh[k] - ph, Vec<A>(Ap[t]), b.gz[k]);
        // (p_hat * coefficient) first: a masked teacher column has p_hat = 0 and u = lowest
        gv[k] = vec::fmadd(ph * Vec<A>(Bv1[t]), u, ph * Vec<A>(Bv0[t]));
        if (refine) X[t].add(phi_term(ph, u, qh[k], Vec<A>(E[t])));
      }
      if (refine) X[t].end_block();
      io.store(t, gv);
    }
  });
  for (int t = 0; t < teachers<MT>(r); ++t)
    if (rf[t]) out.D[t] = T * T * (P.alpha * TCKD[t] + P.beta * std::log1p(X[t].total()));
  // the label column (its lane in the block above held padding): recomputed in double
  if (r.gz) {
    double g = ri.ce ? ri.g_ce * (std::exp((ri.zy - t1.M) - t1.l()) - 1.0) : 0.0;
    for (int t = 0; t < teachers<MT>(r); ++t) g += T * ri.g_kd[t] * P.alpha * (qy - py[t]);
    write_scalar(r.gz, y, g);
  }
  for (int t = 0; t < teachers<MT>(r); ++t) write_scalar(r.gv[t], y, T * ri.g_kd[t] * r.w_v * P.alpha * Gp[t] * py1[t]);
  return out;
}

// ===================================================================================================
// LM, logit matching: d = z - v, dbar = mean(d) (center) or 0, D = (1/2C) sum (d - dbar)^2.
// Pass 1: dbar (and CE's lse); pass 2: D from the centred values (no cancellation) and the gradient.
// ===================================================================================================
template <int MT, class A, class TZ, class TV>
RowOut row_lm(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri) {
  const int64_t C = r.C;
  Lse<A> S1;
  // the means of z and of each v apart (not of z - v: with different offsets, z_j - v_j rounds at the
  // offsets' scale, and the centred difference (z_j - zbar) - (v_j - vbar) does not), each summed
  // exactly in double lanes (a float sum rounds at the values' offset, and a mean off by e leaves e / C
  // in every gradient entry, whose exact row sum is 0)
  LongSum<A> Szs, Sd[kCap<MT>];
  if (P.center || ri.ce) {
    sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> e[kBlock];
      if (P.center) {
        for (int k = 0; k < kBlock; ++k) Szs.add_exact(live_only(sp, b, k, b.z[k]));
        for (int t = 0; t < teachers<MT>(r); ++t) {
          io.load(t, v);
          for (int k = 0; k < kBlock; ++k) Sd[t].add_exact(live_only(sp, b, k, v[k]));
          Sd[t].end_block();
        }
      }
      if (ri.ce) S1.update(b.z, e);
    });
  }
  const LseTotal t1 = ri.ce ? total(S1) : LseTotal{0.0, 1.0};
  // u_j = (z_j - zbar) - (v_j - vbar) (center) or z_j - v_j, D = sum u^2 / 2C:
  // dD/dz_j = u_j / C (the means' own derivatives sum to zero); dD/dv_j = -dD/dz_j;
  // dCE/dz_j = exp((z_j - M1) - l1) - [j = y] (M1 + l1 = lse(z), never rounded as one number). M teachers: dz = sum_t g_t (d_tj - dbar_t) / C.
  // (the means are rounded to A for the vector code; what the rounding took off, fix[t], is added
  // back to u: a constant shift of u would otherwise survive in the gradient, whose exact row sum is 0)
  A cz[kCap<MT>] = {}, cv[kCap<MT>] = {}, nvbar[kCap<MT>] = {}, fix[kCap<MT>] = {};
  const double zbar = P.center ? Szs.total() / double(C) : 0.0;
  const A nzbar = A(-zbar);
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double vbar = P.center ? Sd[t].total() / double(C) : 0.0;
    nvbar[t] = A(-vbar);
    fix[t] = A((-zbar - double(nzbar)) - (-vbar - double(nvbar[t])));
    cz[t] = A(ri.g_kd[t] / double(C));
    cv[t] = A(-ri.g_kd[t] / double(C) * r.w_v);
  }
  const A gce = A(ri.ce ? ri.g_ce : 0.0), nM1 = A(-t1.M), nl1 = A(-t1.l());
  const bool grads = r.gz || r.gv[0];
  LongSum<A> SS[kCap<MT>];
  sweep<A>(r, -1, grads, [&](auto sp, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    if (grads) {
      for (int k = 0; k < kBlock; ++k)
        b.gz[k] = ri.ce ? vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)) * Vec<A>(gce) : Vec<A>(A(0));
      if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));  // CE's -1 before the (small) KD terms
    }
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      SS[t].end_block();
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> u = live_only(sp, b, k, ((b.z[k] + Vec<A>(nzbar)) - (v[k] + Vec<A>(nvbar[t]))) + Vec<A>(fix[t]));
        SS[t].fma(u, u);
        if (grads) {
          b.gz[k] = vec::fmadd(u, Vec<A>(cz[t]), b.gz[k]);
          gv[k] = u * Vec<A>(cv[t]);
        }
      }
      if (grads) io.store(t, gv);
    }
  });
  RowOut out;
  for (int t = 0; t < teachers<MT>(r); ++t) out.D[t] = SS[t].total() / (2.0 * double(C));
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  return out;
}

// ===================================================================================================
// LS, logit standardisation: KD (s = T^2) on z' = (z - zbar) / (eps + sigma_z), v' likewise, sigma the
// unbiased standard deviation, eps = 1e-7; T = Ts = Tt; C >= 2. Passes: 1 means (and CE's lse),
// 2 variances, 3 the online lse / KL / sum(gamma u) statistics, 4 the gradient.
// ===================================================================================================
template <int MT, class A, class TZ, class TV>
RowOut row_ls(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri) {
  const int64_t C = r.C;
  const double T = P.ts, eps = 1e-7;
  const bool gz_on = r.gz != nullptr, gv_on = r.gv[0] != nullptr;
  Lse<A> S1;
  LongSum<A> Sz, Sv[kCap<MT>];
  // the means summed exactly (in double lanes, see row_lm)
  sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> e[kBlock];
    for (int k = 0; k < kBlock; ++k) Sz.add_exact(live_only(sp, b, k, b.z[k]));
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) Sv[t].add_exact(live_only(sp, b, k, v[k]));
      Sv[t].end_block();
    }
    if (ri.ce) S1.update(b.z, e);
  });
  // means rounded to A; fz / fv[t], what the rounding took off, are added back where a constant shift
  // of u would survive (the sigma terms of the gradients; the softmaxes do not see a shift)
  const double zbar = Sz.total() / double(C);
  const A nzbar = A(-zbar);
  const double fz = -zbar - double(nzbar);
  A nvbar[kCap<MT>] = {};
  double fv[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double vbar = Sv[t].total() / double(C);
    nvbar[t] = A(-vbar);
    fv[t] = -vbar - double(nvbar[t]);
  }
  LongSum<A> Qz, Qv[kCap<MT>];
  sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    for (int k = 0; k < kBlock; ++k) {
      const Vec<A> uz = live_only(sp, b, k, b.z[k] + Vec<A>(nzbar));
      Qz.fma(uz, uz);
    }
    Qz.end_block();
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> uv = live_only(sp, b, k, v[k] + Vec<A>(nvbar[t]));
        Qv[t].fma(uv, uv);
      }
      Qv[t].end_block();
    }
  });
  const double sz = std::sqrt(Qz.total() / double(C - 1)), kz = eps + sz;
  const A iz = A(1.0 / (kz * T));
  double sv[kCap<MT>] = {}, kv[kCap<MT>] = {};
  A iv[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    sv[t] = std::sqrt(Qv[t].total() / double(C - 1));
    kv[t] = eps + sv[t];
    iv[t] = A(1.0 / (kv[t] * T));
  }
  // Pass 3, with a = u_z / (k_z T), c = u_v / (k_v T): the KL-kind statistics (W of d_j = (c_j - m_v) -
  // (a_j - m_z), shifted when the lane maxima move, see row_kl), plus
  //   Qu = sum e^a u_z, Pu = sum e^c u_z     (student chain rule: sum_k gamma_k u_k)
  //   PCu = sum e^c d u_v, PUv = sum e^c u_v  (teacher chain rule; PCu shifted like W, with PUv as mass)
  // each at the scale of its stream's running max (rescaled with it); Qu once, the others per teacher.
  Lse<A> La, Lc[kCap<MT>];
  Vec<A> Qu(A(0)), Wk[kCap<MT>], Pu[kCap<MT>], PCu[kCap<MT>], PUv[kCap<MT>], R[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) Wk[t] = Pu[t] = PCu[t] = PUv[t] = R[t] = Vec<A>(A(0));
  sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> a[kBlock], c[kBlock], uz[kBlock], uv[kBlock], e[kBlock];
    for (int k = 0; k < kBlock; ++k) {
      uz[k] = live_only(sp, b, k, b.z[k] + Vec<A>(nzbar));
      a[k] = uz[k] * Vec<A>(iz);
      if constexpr (decltype(sp)::value)  // padding lanes: -inf, so that they add exp(-inf) = 0
        a[k] = Vec<A>::blendv(Vec<A>(ninf<A>()), a[k], b.live[k]);
    }
    const Vec<A> ra = La.update(a, e);
    Vec<A> qu = Qu * ra;
    for (int k = 0; k < kBlock; ++k) qu = vec::fmadd(e[k], uz[k], qu);
    Qu = qu;
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        uv[k] = live_only(sp, b, k, v[k] + Vec<A>(nvbar[t]));
        c[k] = uv[k] * Vec<A>(iv[t]);
        if constexpr (decltype(sp)::value) c[k] = Vec<A>::blendv(Vec<A>(ninf<A>()), c[k], b.live[k]);
      }
      const Vec<A> mc0 = Lc[t].m, sc0 = Lc[t].s, puv0 = PUv[t];
      const Vec<A> rc = Lc[t].update(c, e);
      const Vec<A> R1 = track_ref(R[t], c, a, Lc[t].m);
      const Vec<A> dmc = Lc[t].m - mc0, dR = R1 - R[t];
      R[t] = R1;
      Vec<A> w = shift_w(Wk[t], rc, sc0, dmc, dR), pu = Pu[t] * rc;
      Vec<A> pcu = shift_w(PCu[t], rc, puv0, dmc, dR), puv = PUv[t] * rc;
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> d = finite_floor(c[k] - Lc[t].m) - finite_floor(a[k] - R1);
        w = vec::fmadd(e[k], d, w);
        pu = vec::fmadd(e[k], uz[k], pu);
        if (gv_on) {
          pcu = vec::fmadd(e[k] * d, uv[k], pcu);
          puv = vec::fmadd(e[k], uv[k], puv);
        }
      }
      Wk[t] = w, Pu[t] = pu, PCu[t] = pcu, PUv[t] = puv;
    }
  });
  const LseTotal ta = total(La);
  const double lz = ta.l();
  const LseTotal t1 = ri.ce ? total(S1) : LseTotal{0.0, 1.0};
  RowOut out;
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  double Mv[kCap<MT>] = {}, lv[kCap<MT>] = {}, Rr[kCap<MT>] = {}, dbar[kCap<MT>] = {}, KL1[kCap<MT>] = {};
  LseTotal tc[kCap<MT>] = {};
  bool refine = false, rf[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    tc[t] = total(Lc[t]);
    Mv[t] = tc[t].M, lv[t] = tc[t].l();
    Rr[t] = at_row_max(Lc[t], tc[t], R[t]);
    dbar[t] = shifted_sum(Wk[t], Lc[t].s, Lc[t], tc[t], R[t], Rr[t]) / tc[t].S;
    const double off = (ta.M - Rr[t]) - (lv[t] - lz);
    KL1[t] = dbar[t] + off;
    out.D[t] = T * T * KL1[t];
    rf[t] = needs_refine(KL1[t], std::abs(dbar[t]) + 1.0);
    refine |= rf[t];
  }
  if (!gz_on && !gv_on && !refine) return out;

  // Student: gamma_j = dD/dz'_j = T (q_j - p_j), sum_j gamma_j = 0. With z' = u / k, k = eps + sigma,
  // d sigma / d z_j = u_j / ((C-1) sigma) and d u_k / d z_j = delta_jk - 1/C (the -1/C term meets
  // sum gamma = 0):  dD/dz_j = gamma_j / k - (sum_k gamma_k u_k) u_j / (k^2 (C-1) sigma).
  // Teacher: the same chain with gamma^v_j = T p_j (log p_j - log q_j - KL) = T p_j (d_j - dbar) (see
  // row_kl; sum = 0), so sum_k gamma^v_k u_vk = T (sum p d u_v - dbar sum p u_v).
  // A constant row (sigma = 0, u = 0) has no sigma term (its 0/0 is taken as 0).
  // M teachers: dz = sum_t cq_t (q_j - p_tj) + u_zj sum_t cu_t (the differences first, as in row_kl).
  const double Qs = rescaled_sum(Qu, La, ta) / ta.S;
  double cus = 0;
  A cq[kCap<MT>] = {}, cp[kCap<MT>] = {}, cuv[kCap<MT>] = {}, fcuv[kCap<MT>] = {}, nMv[kCap<MT>] = {}, nlv[kCap<MT>] = {};
  A ndbar[kCap<MT>] = {}, E[kCap<MT>] = {}, nR[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    nR[t] = A(-Rr[t]);
    const double Gz = T * (Qs - rescaled_sum(Pu[t], Lc[t], tc[t]) / tc[t].S);
    const double Gv = T * (shifted_sum(PCu[t], PUv[t], Lc[t], tc[t], R[t], Rr[t]) / tc[t].S
                           - dbar[t] * rescaled_sum(PUv[t], Lc[t], tc[t]) / tc[t].S);
    const double g = ri.g_kd[t], gv = ri.g_kd[t] * r.w_v;
    cq[t] = A(g * T / kz);
    cus += sz > 0 ? -g * Gz / (kz * kz * double(C - 1) * sz) : 0.0;
    cp[t] = A(gv * T / kv[t]);
    cuv[t] = A(sv[t] > 0 ? -gv * Gv / (kv[t] * kv[t] * double(C - 1) * sv[t]) : 0.0);
    fcuv[t] = A(fv[t] * double(cuv[t]));
    nMv[t] = A(-Mv[t]);
    nlv[t] = A(-lv[t]);
    ndbar[t] = A(-dbar[t]);
    E[t] = A(rf[t] ? std::exp(KL1[t]) : 0.0);
  }
  const A Acu = A(cus), fAcu = A(fz * cus);
  const A nMz = A(-ta.M), nlz = A(-lz), nM1 = A(-t1.M), nl1 = A(-t1.l()), gce = A(ri.ce ? ri.g_ce : 0.0);
  LongSum<A> X[kCap<MT>];
  sweep<A>(r, -1, gz_on || gv_on, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    Vec<A> q[kBlock], a[kBlock];
    // the student's terms, once; CE's -1 at the label before the small KD terms are added (added
    // after them, the rounding of g_ce (softmax - 1) + small would be at g_ce's scale)
    for (int k = 0; k < kBlock; ++k) {
      const Vec<A> uz = b.z[k] + Vec<A>(nzbar);
      a[k] = uz * Vec<A>(iz);
      q[k] = vexp((a[k] + Vec<A>(nMz)) + Vec<A>(nlz));
      b.gz[k] = ri.ce ? vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)) * Vec<A>(gce) : Vec<A>(A(0));
    }
    if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));
    for (int k = 0; k < kBlock; ++k)
      b.gz[k] = vec::fmadd(b.z[k] + Vec<A>(nzbar), Vec<A>(Acu), b.gz[k] + Vec<A>(fAcu));
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> uv = v[k] + Vec<A>(nvbar[t]);
        const Vec<A> xc = uv * Vec<A>(iv[t]) + Vec<A>(nMv[t]);
        const Vec<A> p = vexp(xc + Vec<A>(nlv[t]));
        const Vec<A> u = (finite_floor(xc) - finite_floor(a[k] + Vec<A>(nR[t]))) + Vec<A>(ndbar[t]);
        b.gz[k] = vec::fmadd(q[k] - p, Vec<A>(cq[t]), b.gz[k]);
        gv[k] = vec::fmadd(p * u, Vec<A>(cp[t]), vec::fmadd(uv, Vec<A>(cuv[t]), Vec<A>(fcuv[t])));
        if (refine) X[t].add(phi_term(p, u, q[k], Vec<A>(E[t])));
      }
      if (refine) X[t].end_block();
      io.store(t, gv);
    }
  });
  for (int t = 0; t < teachers<MT>(r); ++t)
    if (rf[t]) out.D[t] = T * T * std::log1p(X[t].total());
  return out;
}

// Per-thread scratch of at least n values of A, reused across rows and calls (JSD's per-element values
// between its statistics sweep and its gradient sweep; one row's worth stays in L2 up to C ~ 32K).
template <class A>
inline A* scratch(int64_t n) {
  thread_local std::vector<A> buf;
  if (int64_t(buf.size()) < n) buf.resize(size_t(n));
  return buf.data();
}

// ===================================================================================================
// JSD for 0 < beta < 1: m = beta p + (1 - beta) q, D = beta KL(p || m) + (1 - beta) KL(q || m),
// T = Ts = Tt (no T^2). Three sweeps, each element's exp and log computed once:
//   1. the online lse of the student and of each teacher; each element's exp(a - m_run) and
//      exp(c - m_run) (the running max of its lane at its block) go to a per-thread fp32 scratch row,
//      the block's running maxima beside them;
//   2. q = exp(a - m_run) * exp(m_run - Lz) (one exp per block and lane, not per element), p alike,
//      log m, and the sums KLq, KLp (which the gradient needs); q, H = sum_t cz_t (log q - log m_t)
//      (p_t, log p_t - log m_t per teacher) replace the exponentials in the scratch when a gradient
//      is asked for;
//   3. the gradient from the scratch alone (no load of z or v unless CE needs softmax(z) at T != 1).
// ===================================================================================================
template <int MT, class A, class TZ, class TV>
RowOut row_jsd(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri) {
  constexpr int W = Vec<A>::size();
  constexpr int64_t B = int64_t(kBlock) * W;
  const int M = teachers<MT>(r);
  const double T = P.ts, beta = P.beta;
  const InvT<A> iT(T);
  const bool ce_sep = ri.ce && T != 1.0;
  const bool gz_on = r.gz != nullptr, gv_on = r.gv[0] != nullptr;
  // scratch (rows padded to whole blocks): sq holds exp(a - m_run) after sweep 1, then q; sh the
  // student's H; per teacher t, sp[t] exp(c - m_run), then p, and shp[t] log p - log m; then the maxima
  const int64_t Cp = (r.C + B - 1) / B * B, nb = Cp / B;
  A* const sq = scratch<A>((2 + 2 * M) * Cp + (1 + M) * nb * W);
  A* const sh = sq + Cp;
  A* const mz = sq + (2 + 2 * M) * Cp;
  A* sp[kCap<MT>];
  A* shp[kCap<MT>];
  A* mv[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) {
    sp[t] = sq + (2 + 2 * t) * Cp;
    shp[t] = sp[t] + Cp;
    mv[t] = mz + (1 + t) * nb * W;
  }
  // (the lambdas work on local copies of their accumulators: the float stores into the scratch
  // could alias them, which made the compiler reload every accumulator after every store)
  Lse<A> Sz, S1, Sv[kCap<MT>];
  sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> a[kBlock], c[kBlock], e[kBlock];
    for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
    Lse<A> lz = Sz;
    lz.update(a, e);
    if (ce_sep) {
      Lse<A> l1 = S1;
      Vec<A> g[kBlock];
      l1.update(b.z, g);
      S1 = l1;
    }
    Sz = lz;
    for (int k = 0; k < kBlock; ++k) e[k].store(sq + j0 + k * W);
    lz.m.store(mz + j0 / B * W);
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) c[k] = vscale(v[k], iT);
      Lse<A> lv = Sv[t];
      lv.update(c, e);
      Sv[t] = lv;
      for (int k = 0; k < kBlock; ++k) e[k].store(sp[t] + j0 + k * W);
      lv.m.store(mv[t] + j0 / B * W);
    }
  });
  // log-softmaxes as (x - M) - l (M the row max, l = log S): no rounded lse is subtracted from a logit
  const LseTotal tz = total(Sz);
  const LseTotal t1 = ri.ce ? (ce_sep ? total(S1) : tz) : LseTotal{0.0, 1.0};
  const A nMz = A(-tz.M), nlz = A(-tz.l());
  A nMv[kCap<MT>] = {}, nlv[kCap<MT>] = {}, cz[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const LseTotal tv = total(Sv[t]);
    nMv[t] = A(-tv.M), nlv[t] = A(-tv.l());
    cz[t] = A(ri.g_kd[t] * (1.0 - beta) / T);
  }
  // Per element, log m in log space (never the log of beta p + (1 - beta) q, which is log 0 when both
  // underflow): with delta_j = log(beta / (1 - beta)) + log p_j - log q_j and sp(x) = log(1 + e^x),
  //   hq_j = log q_j - log m_j = -log(1 - beta) - sp(delta_j),  hp_j = log p_j - log m_j = -log beta - sp(-delta_j). KL(q || m) = -log(1 - beta) - SQ, KL(p || m) = -log beta - SP with the sums of
  // nonnegative terms SQ = sum_j q_j sp(delta_j), SP = sum_j p_j sp(-delta_j); and the gradients'
  //   hq_j - KL(q || m) = SQ - sp(delta_j),  hp_j - KL(p || m) = SP - sp(-delta_j)
  // are differences of small accurate terms in saturated rows (no -log(1 - beta) to cancel).
  // A zero probability (log floored to `lowest`) gives delta = -+huge: its sp terms are 0 or huge, times 0.
  const A lb = A(std::log(beta) - std::log1p(-beta));
  LongSum<A> SP[kCap<MT>], SQ[kCap<MT>];
  // sp(+-delta) = max(+-delta, 0) + log1p(e^-|delta|): both from the one log1p (not sp(-delta) =
  // sp(delta) - delta, which cancels for large delta)
  auto softplus_pair = [&](const Vec<A>& lp, const Vec<A>& lq, Vec<A>& spd, Vec<A>& spn)  {
    const Vec<A> delta = (lp - lq) + Vec<A>(lb);
    const Vec<A> L = vlog1p(vexp(Vec<A>(A(0)) - delta.abs()));
    spd = vec::clamp_min(delta, Vec<A>(A(0))) + L;
    spn = vec::clamp_min(Vec<A>(A(0)) - delta, Vec<A>(A(0))) + L;
  };
  // (the student's values are computed with teacher 0, in the same loop: with one teacher this is
  // one fused loop per vector; q, log q and H are kept for the other teachers)
  sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    const Vec<A> fz = vexp((Vec<A>::loadu(mz + j0 / B * W) + Vec<A>(nMz)) + Vec<A>(nlz));
    Vec<A> q[kBlock], lq[kBlock], H[kBlock], p[kBlock], hp[kBlock];
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      const Vec<A> fv = vexp((Vec<A>::loadu(mv[t] + j0 / B * W) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
      Vec<A> kp = SP[t].part, kq = SQ[t].part;
      for (int k = 0; k < kBlock; ++k) {
        if (t == 0) {
          lq[k] = finite_floor((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz));
          q[k] = Vec<A>::loadu(sq + j0 + k * W) * fz;
        }
        const Vec<A> lp = finite_floor((vscale(v[k], iT) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
        p[k] = Vec<A>::loadu(sp[t] + j0 + k * W) * fv;
        Vec<A> spd, spn;
        softplus_pair(lp, lq[k], spd, spn);
        hp[k] = Vec<A>(A(0)) - spn;
        kp = vec::fmadd(p[k], spn, kp);
        kq = vec::fmadd(q[k], spd, kq);
        H[k] = t == 0 ? spd * Vec<A>(-cz[t]) : vec::fnmadd(spd, Vec<A>(cz[t]), H[k]);
      }
      SP[t].part = kp;
      SQ[t].part = kq;
      SP[t].end_block();
      SQ[t].end_block();
      if (gv_on) {
        for (int k = 0; k < kBlock; ++k) {
          p[k].store(sp[t] + j0 + k * W);
          hp[k].store(shp[t] + j0 + k * W);
        }
      }
    }
    if (gz_on) {
      for (int k = 0; k < kBlock; ++k) {
        q[k].store(sq + j0 + k * W);
        H[k].store(sh + j0 + k * W);
      }
    }
  });
  RowOut out;
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  double SPs[kCap<MT>] = {}, Kqs = 0;
  bool refine = false, rf[kCap<MT>] = {};
  const double Hb = -beta * std::log(beta) - (1.0 - beta) * std::log1p(-beta);  // the entropy of beta
  for (int t = 0; t < teachers<MT>(r); ++t) {
    SPs[t] = SP[t].total();
    const double SQs = SQ[t].total();
    out.D[t] = beta * (-std::log(beta) - SPs[t]) + (1.0 - beta) * (-std::log1p(-beta) - SQs);  // = Hb - ...
    rf[t] = needs_refine(out.D[t], Hb);
    refine |= rf[t];
    Kqs += double(cz[t]) * SQs;
  }
  if (refine) {
    // A small JSD cancels against Hb: the loss from nonnegative terms instead (docs/kernel-math.md,
    // rule 3), in a sweep of its own for such rows. With sum_j q_j e^{-hq_j} = sum_j m_j = 1,
    // KL(q || m) = sum_j q_j phi(-hq_j) (phi_term: the series for |hq| <= 1, else m_j - q_j + q_j hq_j),
    // likewise KL(p || m), hq = -log(1 - beta) - sp(delta), hp = -log beta - sp(-delta).
    const A Ab = A(beta), A1b = A(1.0 - beta), nlb = A(-std::log(beta)), nl1b = A(-std::log1p(-beta));
    LongSum<A> DD[kCap<MT>];
    sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t, const auto& io) {
      Vec<A> v[kBlock], lq[kBlock], q[kBlock];
      for (int k = 0; k < kBlock; ++k) {
        lq[k] = finite_floor((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz));
        q[k] = vexp(lq[k]);
      }
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) {
          const Vec<A> lp = finite_floor((vscale(v[k], iT) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
          const Vec<A> p = vexp(lp), one(A(1));
          Vec<A> spd, spn;
          softplus_pair(lp, lq[k], spd, spn);
          const Vec<A> m = vec::fmadd(p, Vec<A>(Ab), q[k] * Vec<A>(A1b));
          DD[t].add(vec::fmadd(phi_term(p, Vec<A>(nlb) - spn, m, one), Vec<A>(Ab),
                               phi_term(q[k], Vec<A>(nl1b) - spd, m, one) * Vec<A>(A1b)));
        }
        DD[t].end_block();
      }
    });
    for (int t = 0; t < teachers<MT>(r); ++t)
      if (rf[t]) out.D[t] = DD[t].total();
  }
  if (!gz_on && !gv_on) return out;
  // dD/dq_k = (1 - beta)(log q_k - log m_k) (the p/m and q/m terms cancel), then the softmax chain
  // d q_k / d a_j = q_k (delta_jk - q_j), a = z / T:
  //   dD/dz_j = (1/T)(1 - beta) q_j (hq_j - KLq) = (1/T)(1 - beta) q_j (SQ - sp(delta_j)),
  //   dD/dv_j = (1/T) beta p_j (hp_j - KLp) = (1/T) beta p_j (SP - sp(-delta_j))
  // M teachers, cz_t = g_t (1 - beta) / T: dz_j = q_j (H_j + sum_t cz_t SQ_t), H_j = -sum_t cz_t sp(delta_tj).
  // CE: g_ce (softmax(z)_j - [j = y]), softmax(z) = q when T == 1.
  A cv[kCap<MT>] = {}, nKp[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    cv[t] = A(ri.g_kd[t] * beta / T * r.w_v);
    nKp[t] = A(SPs[t]);
  }
  const A nKq = A(Kqs), nM1 = A(-t1.M), nl1 = A(-t1.l()), gce = A(ri.ce ? ri.g_ce : 0.0);
  Row<TZ, TV> rg = r;  // writes only: no loads of z, v (z only for CE's softmax at T = 1)
  rg.zp = nullptr;
  if (!(ce_sep && gz_on)) rg.z = nullptr;
  sweep<A>(rg, -1, true, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> gv[kBlock];  // a teacher's gradient block (locals: kept in registers)
    if (gz_on) {
      for (int k = 0; k < kBlock; ++k) {
        const int64_t o = j0 + k * W;
        b.gz[k] = ri.ce ? (ce_sep ? vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)) : Vec<A>::loadu(sq + o)) * Vec<A>(gce)
                        : Vec<A>(A(0));
      }
      if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));  // CE's -1 before the (small) KD terms
      for (int k = 0; k < kBlock; ++k) {
        const int64_t o = j0 + k * W;
        const Vec<A> q = Vec<A>::loadu(sq + o), h = Vec<A>::loadu(sh + o);
        b.gz[k] = vec::fmadd(q, h + Vec<A>(nKq), b.gz[k]);
      }
    }
    if (gv_on) {
      for (int t = 0; t < teachers<MT>(r); ++t) {
        for (int k = 0; k < kBlock; ++k) {
          const int64_t o = j0 + k * W;
          const Vec<A> p = Vec<A>::loadu(sp[t] + o), hp = Vec<A>::loadu(shp[t] + o);
          gv[k] = p * (hp + Vec<A>(nKp[t])) * Vec<A>(cv[t]);
        }
        io.store(t, gv);
      }
    }
  });
  return out;
}

// ===================================================================================================
// TOPK: a sparse teacher given by k log-probabilities lp_k on classes i_k (no dense teacher row):
// a = z / T, Lz = lse(a) over all C, q = softmax(a);
//   log p_k = lp_k / T - lse_k(lp / T)  (renormalize: the teacher at temperature T on its k classes)
//   log p_k = lp_k                      (as given: stored at the temperature T; sum_k p_k may be < 1)
//   D = s * sum_k p_k (log p_k - a_{i_k} + Lz)    (terms with p_k = 0 are 0; s = T^2)
// tail (as given only): the leftover masses are one more bucket, D = s * KL over k + 1 buckets:
//   D += s * Pt (log Pt - log Qt),  Pt = 1 - sum_k p_k,  Qt = 1 - sum_{k in K} q_{i_k} = sum_{j not in K} q_j
// with K the classes of the finite entries (a -inf entry is padding: its class is in the tail).
// Pass 1 is the student's lse only; the k teacher terms are a gather. Classes must be distinct; one
// outside [0, C) makes the row NaN (never read or written).
// ===================================================================================================
template <class A, class TZ, class TV>
RowOut row_topk(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri, int64_t i) {
  const A* lp = static_cast<const A*>(P.t_lp) + i * P.stk;
  const int64_t* idx = P.t_idx + i * P.sti;
  const int64_t K = P.K, C = r.C;
  const double T = P.ts;
  const InvT<A> iT(T);
  const bool tail = P.tail;
  // tail: CE's softmax always from its own exp (the dense KD term is not a multiple of q)
  const bool ce_sep = ri.ce && (T != 1.0 || tail);
  for (int64_t k = 0; k < K; ++k) {
    if (idx[k] < 0 || idx[k] >= C) {
      fill_row(r.gz, C, NAN);
      RowOut bad;
      bad.D[0] = bad.CE = NAN;
      return bad;
    }
  }
  Lse<A> Sz, S1;
  sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t, const auto&) {
    Vec<A> a[kBlock], e[kBlock];
    for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
    Sz.update(a, e);
    if (ri.ce && T != 1.0) S1.update(b.z, e);
  });
  const LseTotal tz = total(Sz);  // log q_j = (a_j - Mz) - lz (no rounded lse subtracted from a logit)
  const double Mz = tz.M, lz = tz.l();
  const LseTotal t1 = ri.ce ? (T != 1.0 ? total(S1) : tz) : LseTotal{0.0, 1.0};
  double Lt = 0.0;  // lse_k(lp / T): max first, then the sum (k is small: plain double loops)
  if (P.renormalize) {
    double M = -INFINITY;
    for (int64_t k = 0; k < K; ++k) M = std::max(M, double(lp[k]) / T);
    double S = 0.0;
    if (M > -INFINITY && std::isfinite(M)) {
      for (int64_t k = 0; k < K; ++k) S += std::exp(double(lp[k]) / T - M);
      Lt = M + std::log(S);
    } else {
      Lt = M;  // all -inf: no teacher mass (the row adds 0); +inf / NaN propagate
    }
  }
  // the student at the k classes, read before the gradient sweep writes (grad_z may alias z)
  double* zk = scratch<double>(3 * K);
  double* pk = zk + K;
  double Pm = 0.0, S = 0.0;  // P = sum_k p_k, S = sum_k p_k (log p_k - log q_{i_k})
  for (int64_t k = 0; k < K; ++k) {
    zk[k] = double(r.z[idx[k]]);
    // (-inf stays -inf: with no teacher mass in the row, Lt = -inf too, and p = 0 for every k)
    const double l = P.renormalize && lp[k] != -INFINITY ? double(lp[k]) / T - Lt : double(lp[k]);
    pk[k] = std::exp(l);
    if (pk[k] > 0 || std::isnan(l)) {
      Pm += pk[k];
      S += pk[k] * (l - ((scaled(zk[k], iT) - Mz) - lz));
    }
  }
  const double s = P.scale;
  // ---- tail: the two leftover masses, each without cancellation ----
  // Pt = 1 - sum_k p_k = -expm1(lse_k(lp)) (exact when sum_k p_k is near 1; clamped at 0: a teacher
  // mass above 1 within the validation's tolerance is rounding). Qt = St / S with St the sum over the
  // non-K columns of exp(a_j - Mt): first St = S - sum_{k in K} exp(a_{i_k} - Mz) (Mt = Mz); where that
  // subtraction lost more than 3 bits (St < S / 8: the student puts more than 7/8 of its mass on K; or
  // every non-K term underflowed), a sweep of its own over the row with the K lanes masked to -inf:
  // an online lse of the non-K columns relative to their own max Mt (exact terms, no subtraction; St
  // cannot underflow to 0 while a non-K q_j is representable relative to Mt).
  double Pt = 0.0, Mt = Mz, lt = -INFINITY, logQt = -INFINITY;
  if (tail) {
    double Ml = -INFINITY, SK = 0.0;
    for (int64_t k = 0; k < K; ++k)
      if (lp[k] != -INFINITY) {
        Ml = std::max(Ml, double(lp[k]));
        SK += std::exp(scaled(zk[k], iT) - Mz);
      }
    double Sl = 0.0;
    if (Ml > -INFINITY && std::isfinite(Ml)) {
      for (int64_t k = 0; k < K; ++k) Sl += std::exp(double(lp[k]) - Ml);
      Pt = std::max(0.0, -std::expm1(Ml + std::log(Sl)));
    } else {
      Pt = Ml == -INFINITY ? 1.0 : NAN;  // no finite entry: all the teacher's mass is in the tail
    }
    double St = tz.S - SK;
    if (!(St > 0.125 * tz.S)) {
      // the K columns, sorted (as doubles in the scratch: exact below 2^53), to mask them block by block
      double* sk = zk + 2 * K;
      int64_t nk = 0;
      for (int64_t k = 0; k < K; ++k)
        if (lp[k] != -INFINITY) sk[nk++] = double(idx[k]);
      std::sort(sk, sk + nk);
      constexpr int W = Vec<A>::size();
      int64_t at = 0;  // the next K column (the sweep visits the blocks in column order)
      Lse<A> Sm;
      sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j0, const auto&) {
        Vec<A> a[kBlock], e[kBlock];
        for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
        if (at < nk && sk[at] < double(j0 + kBlock * W)) {
          alignas(64) A buf[kBlock * W];
          for (int k = 0; k < kBlock; ++k) a[k].store(buf + k * W);
          for (; at < nk && sk[at] < double(j0 + kBlock * W); ++at) buf[int64_t(sk[at]) - j0] = ninf<A>();
          for (int k = 0; k < kBlock; ++k) a[k] = Vec<A>::loadu(buf + k * W);
        }
        Sm.update(a, e);
      });
      const LseTotal tm = total(Sm);
      Mt = tm.M, St = tm.S;
    }
    lt = St > 0 ? std::log(St) : -INFINITY;
    logQt = (Mt - Mz) + lt - lz;  // log Qt = log(St exp(Mt - Mz) / S)
    // KL over the k + 1 buckets: the tail bucket's Pt (log Pt - log Qt), 0 log 0 = 0. No non-K column
    // with mass (k = C): no tail bucket, whatever rounding left in Pt.
    if ((Pt > 0 || std::isnan(Pt)) && lt > -INFINITY) S += Pt * (std::log(Pt) - logQt);
  }
  RowOut out;
  out.D[0] = s * S;
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  if (!r.gz) return out;
  // dD/da_j = s (P q_j - sum_k p_k [i_k = j]), a = z / T:  dD/dz_j = (s / T)(P q_j - p_j [j in top-k]);
  // plus CE g_ce (softmax(z)_j - [j = y]), softmax(z) = q when T == 1. Dense part in the sweep, the
  // label column and the k teacher columns rewritten after it, in double.
  // tail: with d log q_i / da_j = [i = j] - q_j and d log Qt / da_j = q_j [j not in K] / Qt - q_j,
  //   dD/da_j = s (q_j (sum_k p_k + Pt) - p_j)          = s (q_j - p_j)              j in K
  //   dD/da_j = s (q_j (sum_k p_k + Pt) - Pt q_j / Qt)  = s q_j (1 - Pt / Qt)        j not in K
  // (sum_k p_k + Pt = 1). For j not in K, q_j / Qt = exp((a_j - Mt) - lt) (the non-K softmax, no
  // underflow where the student is saturated on K), so the dense term is
  //   (s / T) (Qt - Pt) exp((a_j - Mt) - lt);   Pt = 0: q_j, the tail adds nothing. Qt = 0 (no non-K
  // column with mass, k = C): no tail bucket and no column takes the dense term; the K columns then
  // get the tail-less (s / T)(P q_j - p_j), P = sum_k p_k (P + Pt = 1 only with the bucket's term).
  const double cp = ri.g_kd[0] * s / T;
  const double Qt = tail ? std::exp(logQt) : 0.0;
  const double ct = tail && lt > -INFINITY ? cp * (Qt - Pt) : 0.0;
  const double qK = lt > -INFINITY ? 1.0 : Pm;  // q's factor on K: sum_k p_k + Pt = 1, or sum_k p_k alone
  const double dM = tail && lt > -INFINITY ? Mt : Mz, dl = tail && lt > -INFINITY ? lt : lz;
  const A cq = A(tail ? ct : cp * Pm + (ri.ce && !ce_sep ? ri.g_ce : 0.0));
  const A B1 = A(ce_sep ? ri.g_ce : 0.0), nMz = A(-dM), nlz = A(-dl), nM1 = A(-t1.M), nl1 = A(-t1.l());
  sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t, const auto&) {
    for (int k = 0; k < kBlock; ++k) {
      Vec<A> gz = vexp((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz)) * Vec<A>(cq);
      if (ce_sep) gz = vec::fmadd(vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)), Vec<A>(B1), gz);
      b.gz[k] = gz;
    }
  });
  auto ce_part = [&](double zj) { return ri.ce ? ri.g_ce * std::exp((zj - t1.M) - t1.l()) : 0.0; };
  auto dense = [&](double zj) {  // the value the sweep wrote (tail: a non-K column's)
    return (tail ? ct * std::exp((scaled(zj, iT) - dM) - dl)
                 : cp * Pm * std::exp((scaled(zj, iT) - Mz) - lz)) + ce_part(zj);
  };
  if (ri.ce) write_scalar(r.gz, ri.y, dense(ri.zy) - ri.g_ce);
  for (int64_t k = 0; k < K; ++k) {
    const double lab = ri.ce && idx[k] == ri.y ? ri.g_ce : 0.0;
    if (!tail) {
      write_scalar(r.gz, idx[k], dense(zk[k]) - cp * pk[k] - lab);
    } else if (lp[k] != -INFINITY) {  // a K column: (s / T)(q_j - p_j); no tail bucket: (s / T)(P q_j - p_j)
      write_scalar(r.gz, idx[k], cp * (qK * std::exp((scaled(zk[k], iT) - Mz) - lz) - pk[k]) + ce_part(zk[k]) - lab);
    }  // (a padding entry's class is a tail column: the sweep's value stands)
  }
  return out;
}
