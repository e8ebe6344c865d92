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

// A plain per-lane sum over a long row: the fp32 lanes are flushed into double lanes every kFlush
// blocks, so the rounding error grows with kFlush * kBlock terms, not with C (a 131072-column row
// adds 16K terms per lane). For the rescaled online sums (KL's W and friends) see Lse.
template <class A>
struct LongSum {
  static constexpr int W = Vec<A>::size();
  static constexpr int kFlush = 16;
  Vec<A> part{A(0)};
  double acc[W] = {};
  int n = 0;
  void fma(const Vec<A>& a, const Vec<A>& b) { part = vec::fmadd(a, b, part); }
  void add(const Vec<A>& a) { part = part + a; }
  void end_block() {
    if (++n == kFlush) flush();
  }
  void flush() {
    alignas(64) A t[W];
    part.store(t);
    for (int l = 0; l < W; ++l) acc[l] += double(t[l]);
    part = Vec<A>(A(0));
    n = 0;
  }
  double total() {
    flush();
    double s = 0;
    for (int l = 0; l < W; ++l) s += acc[l];
    return s;
  }
};

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
  const A iT = A(1.0 / T);
  const int64_t y = ri.y;
  const bool ce_sep = ri.ce && T != 1.0;
  Lse<A> Sz, S1, Sv[kCap<MT>];
  Vec<A> W[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) W[t] = Vec<A>(A(0));
  sweep<A>(r, y, false, [&](auto, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> a[kBlock], c[kBlock], e[kBlock];
    for (int k = 0; k < kBlock; ++k) a[k] = b.z[k] * Vec<A>(iT);
    Sz.update(a, e);
    if (ce_sep) S1.update(b.z, e);
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) c[k] = v[k] * Vec<A>(iT);
      const Vec<A> rv = Sv[t].update(c, e);
      Vec<A> w = W[t] * rv;
      for (int k = 0; k < kBlock; ++k) w = vec::fmadd(e[k], finite_floor(c[k]) - finite_floor(a[k]), w);
      W[t] = w;
    }
  });
  const LseTotal tz = total(Sz);
  const double Lzn = tz.lse();  // lse over j != y
  const double ay = ri.zy / T;
  const double Lz = logaddexp(Lzn, ay);
  const double lqy = ay - Lz, l1qy = Lzn - Lz, qy = std::exp(lqy), qy1 = std::exp(l1qy);
  const double L1 = ri.ce ? (ce_sep ? logaddexp(total(S1).lse(), ri.zy) : Lz) : 0.0;
  RowOut out;
  out.CE = ri.ce ? L1 - ri.zy : 0.0;
  // per teacher: Lv\y, NCKD, p_y, 1 - p_y, G p_y (see the gradient comment below)
  double Lvn[kCap<MT>] = {}, NCKD[kCap<MT>] = {}, py[kCap<MT>] = {}, py1[kCap<MT>] = {}, Gp[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const LseTotal tv = total(Sv[t]);
    Lvn[t] = tv.lse();
    const double cy = ri.vy[t] / T;
    const double Lv = logaddexp(Lvn[t], cy);
    // NCKD = KL(p_hat || q_hat) over j != y = sum p_hat (c - a) - Lv\y + Lz\y (0 if the teacher has no
    // non-target mass)
    NCKD[t] = tv.S > 0 ? rescaled_sum(W[t], Sv[t], tv) / tv.S - Lvn[t] + Lzn : 0.0;
    const double lpy = cy - Lv, l1py = Lvn[t] - Lv;  // log p_y, log(1 - p_y)
    py[t] = std::exp(lpy), py1[t] = std::exp(l1py);
    const double TCKD = (py[t] > 0 ? py[t] * (lpy - lqy) : 0.0) + (py1[t] > 0 ? py1[t] * (l1py - l1qy) : 0.0);
    out.D[t] = T * T * (P.alpha * TCKD + P.beta * NCKD[t]);
    Gp[t] = clamp_finite(py[t] > 0 ? ((lpy - lqy) - (l1py - l1qy)) * py[t] : 0.0);
  }
  if (!r.gz && !r.gv[0]) return out;

  // Gradients (s = T^2, da/dz = 1/T: a factor T overall). With q_hat_j = exp(a_j - Lz\y),
  // q_j = q_hat_j (1 - q_y), and TCKD = const - p_y a_y - (1 - p_y) Lz\y + Lz in a:
  //   dD/dz_j = T g (alpha (q_j - (1 - p_y) q_hat_j) + beta (q_hat_j - p_hat_j))              j != y
  //           = q_hat_j * T g (alpha (1 - q_y) - alpha (1 - p_y) + beta) - p_hat_j * T g beta
  //   dD/dz_y = T g alpha (q_y - p_y)
  // In c, TCKD's gradient is G p_y ([j = y] - p_j), G = log(p_y/q_y) - log((1-p_y)/(1-q_y)), and
  // NCKD's is the KL-kind teacher gradient over j != y; with p_j = p_hat_j (1 - p_y):
  //   dD/dv_j = p_hat_j * (T g beta (c_j - a_j + Lz\y - Lv\y - NCKD) - T g alpha G p_y (1 - p_y))  j != y
  //   dD/dv_y = T g alpha G p_y (1 - p_y)
  // plus CE: g_ce (softmax(z)_j - [j = y]); softmax(z)_j = q_j = q_hat_j (1 - q_y) when T == 1.
  // M teachers: dz sums the q_hat coefficients (Aq) and subtracts each teacher's p_hat term.
  double Aqs = ri.ce && !ce_sep ? ri.g_ce * qy1 : 0.0;
  A Ap[kCap<MT>] = {}, Bv1[kCap<MT>] = {}, Bv0[kCap<MT>] = {}, nLvn[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double Tg = T * ri.g_kd[t], Tgv = Tg * r.w_v;
    Aqs += Tg * (P.alpha * qy1 - P.alpha * py1[t] + P.beta);
    Ap[t] = A(Tg * P.beta);
    Bv1[t] = A(Tgv * P.beta);
    Bv0[t] = A(Tgv * P.beta * (Lzn - Lvn[t] - NCKD[t]) - Tgv * P.alpha * Gp[t] * py1[t]);
    nLvn[t] = A(-Lvn[t]);
  }
  const A Aq = A(Aqs);
  const A B1 = A(ce_sep ? ri.g_ce : 0.0);
  const A nLzn = A(-Lzn), nL1 = A(-L1);
  sweep<A>(r, y, true, [&](auto, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> a = b.z[k] * Vec<A>(iT), c = v[k] * Vec<A>(iT);
        if (t == 0) {  // the student's terms, once
          Vec<A> gz = vexp(a + Vec<A>(nLzn)) * Vec<A>(Aq);
          if (ce_sep) gz = vec::fmadd(vexp(b.z[k] + Vec<A>(nL1)), Vec<A>(B1), gz);
          b.gz[k] = gz;
        }
        const Vec<A> ph = vexp(c + Vec<A>(nLvn[t]));
        b.gz[k] = b.gz[k] - ph * Vec<A>(Ap[t]);
        // (p_hat * coefficient) first: a masked teacher column has p_hat = 0 and c = lowest, and
        // 0 * (lowest * Bv1) would be 0 * -inf
        gv[k] = vec::fmadd(ph * Vec<A>(Bv1[t]), finite_floor(c) - finite_floor(a), ph * Vec<A>(Bv0[t]));
      }
      io.store(t, gv);
    }
  });
  // the label column (its lane in the block above held padding): recomputed in double
  if (r.gz) {
    double g = ri.ce ? ri.g_ce * (std::exp(ri.zy - L1) - 1.0) : 0.0;
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
  LongSum<A> Sd[kCap<MT>];
  if (P.center || ri.ce) {
    sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> e[kBlock];
      if (P.center) {
        for (int t = 0; t < teachers<MT>(r); ++t) {
          io.load(t, v);
          for (int k = 0; k < kBlock; ++k) Sd[t].add(live_only(sp, b, k, b.z[k] - v[k]));
          Sd[t].end_block();
        }
      }
      if (ri.ce) S1.update(b.z, e);
    });
  }
  const double L1 = ri.ce ? total(S1).lse() : 0.0;
  // dD/dz_j = (d_j - dbar) / C (the dbar term's own derivative sums to zero); dD/dv_j = -dD/dz_j;
  // dCE/dz_j = exp(z_j - L1) - [j = y]. M teachers: dz = sum_t g_t (d_tj - dbar_t) / C.
  A cz[kCap<MT>] = {}, cv[kCap<MT>] = {}, ndbar[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    ndbar[t] = A(P.center ? -Sd[t].total() / double(C) : 0.0);
    cz[t] = A(ri.g_kd[t] / double(C));
    cv[t] = A(-ri.g_kd[t] / double(C) * r.w_v);
  }
  const A gce = A(ri.ce ? ri.g_ce : 0.0), nL1 = A(-L1);
  const bool grads = r.gz || r.gv[0];
  LongSum<A> SS[kCap<MT>];
  sweep<A>(r, -1, grads, [&](auto sp, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    if (grads) {
      for (int k = 0; k < kBlock; ++k)
        b.gz[k] = ri.ce ? vexp(b.z[k] + Vec<A>(nL1)) * Vec<A>(gce) : Vec<A>(A(0));
    }
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      SS[t].end_block();
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> u = live_only(sp, b, k, b.z[k] - v[k] + Vec<A>(ndbar[t]));
        SS[t].fma(u, u);
        if (grads) {
          b.gz[k] = vec::fmadd(u, Vec<A>(cz[t]), b.gz[k]);
          gv[k] = u * Vec<A>(cv[t]);
        }
      }
      if (grads) io.store(t, gv);
    }
    if (grads && ri.ce) add_at(b.gz, j0, ri.y, A(-gce));
  });
  RowOut out;
  for (int t = 0; t < teachers<MT>(r); ++t) out.D[t] = SS[t].total() / (2.0 * double(C));
  out.CE = ri.ce ? L1 - ri.zy : 0.0;
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
  sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    Vec<A> e[kBlock];
    for (int k = 0; k < kBlock; ++k) Sz.add(live_only(sp, b, k, b.z[k]));
    Sz.end_block();
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) Sv[t].add(live_only(sp, b, k, v[k]));
      Sv[t].end_block();
    }
    if (ri.ce) S1.update(b.z, e);
  });
  const double zbar = Sz.total() / double(C);
  const A nzbar = A(-zbar);
  A nvbar[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) nvbar[t] = A(-Sv[t].total() / double(C));
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
  // Pass 3, with a = u_z / (k_z T), c = u_v / (k_v T): the KL-kind statistics, plus
  //   Qu = sum e^z u_z, Pu = sum e^v u_z     (student chain rule: sum_k gamma_k u_k)
  //   PCu = sum e^v (c - a) u_v, PUv = sum e^v u_v   (teacher chain rule)
  // each at the scale of its stream's running max (rescaled with it); Qu once, the others per teacher.
  Lse<A> La, Lc[kCap<MT>];
  Vec<A> Qu(A(0)), Wk[kCap<MT>], Pu[kCap<MT>], PCu[kCap<MT>], PUv[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) Wk[t] = Pu[t] = PCu[t] = PUv[t] = Vec<A>(A(0));
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
      const Vec<A> rc = Lc[t].update(c, e);
      Vec<A> w = Wk[t] * rc, pu = Pu[t] * rc, pcu = PCu[t] * rc, puv = PUv[t] * rc;
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> d = finite_floor(c[k]) - finite_floor(a[k]);
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
  const double Lz = ta.lse();
  const double L1 = ri.ce ? total(S1).lse() : 0.0;
  RowOut out;
  out.CE = ri.ce ? L1 - ri.zy : 0.0;
  double Lv[kCap<MT>] = {}, KL[kCap<MT>] = {};
  LseTotal tc[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    tc[t] = total(Lc[t]);
    Lv[t] = tc[t].lse();
    KL[t] = rescaled_sum(Wk[t], Lc[t], tc[t]) / tc[t].S - Lv[t] + Lz;
    out.D[t] = T * T * KL[t];
  }
  if (!gz_on && !gv_on) return out;

  // Student: gamma_j = dD/dz'_j = T (q_j - p_j), sum_j gamma_j = 0. With z' = u / k, k = eps + sigma,
  // d sigma / d z_j = u_j / ((C-1) sigma) and d u_k / d z_j = delta_jk - 1/C (the -1/C term meets
  // sum gamma = 0):  dD/dz_j = gamma_j / k - (sum_k gamma_k u_k) u_j / (k^2 (C-1) sigma).
  // Teacher: the same chain with gamma^v_j = T p_j (c_j - a_j + Lz - Lv - KL) (sum = 0).
  // A constant row (sigma = 0, u = 0) has no sigma term (its 0/0 is taken as 0).
  // M teachers: dz = q_j sum_t cq_t - sum_t p_tj cq_t + u_zj sum_t cu_t.
  const double Qs = rescaled_sum(Qu, La, ta) / ta.S;
  double cqs = 0, cus = 0;
  A cq[kCap<MT>] = {}, cp[kCap<MT>] = {}, cuv[kCap<MT>] = {}, nLv[kCap<MT>] = {}, AK[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double Gz = T * (Qs - rescaled_sum(Pu[t], Lc[t], tc[t]) / tc[t].S);
    const double K = Lz - Lv[t] - KL[t];
    const double Gv = T * (rescaled_sum(PCu[t], Lc[t], tc[t]) / tc[t].S + K * rescaled_sum(PUv[t], Lc[t], tc[t]) / tc[t].S);
    const double g = ri.g_kd[t], gv = ri.g_kd[t] * r.w_v;
    cq[t] = A(g * T / kz);
    cqs += g * T / kz;
    cus += sz > 0 ? -g * Gz / (kz * kz * double(C - 1) * sz) : 0.0;
    cp[t] = A(gv * T / kv[t]);
    cuv[t] = A(sv[t] > 0 ? -gv * Gv / (kv[t] * kv[t] * double(C - 1) * sv[t]) : 0.0);
    nLv[t] = A(-Lv[t]);
    AK[t] = A(K);
  }
  const A Acq = A(cqs), Acu = A(cus);
  const A nLz = A(-Lz), nL1 = A(-L1), gce = A(ri.ce ? ri.g_ce : 0.0);
  sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> uz = b.z[k] + Vec<A>(nzbar), uv = v[k] + Vec<A>(nvbar[t]);
        const Vec<A> a = uz * Vec<A>(iz), c = uv * Vec<A>(iv[t]);
        if (t == 0) {  // the student's terms, once
          Vec<A> gz = vec::fmadd(vexp(a + Vec<A>(nLz)), Vec<A>(Acq), uz * Vec<A>(Acu));
          if (ri.ce) gz = vec::fmadd(vexp(b.z[k] + Vec<A>(nL1)), Vec<A>(gce), gz);
          b.gz[k] = gz;
        }
        const Vec<A> p = vexp(c + Vec<A>(nLv[t]));
        b.gz[k] = b.gz[k] - p * Vec<A>(cq[t]);
        gv[k] = vec::fmadd(p * (finite_floor(c) - finite_floor(a) + Vec<A>(AK[t])), Vec<A>(cp[t]),
                             uv * Vec<A>(cuv[t]));
      }
      io.store(t, gv);
    }
    if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));
  });
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
  const A iT = A(1.0 / T), Ab = A(beta), A1b = A(1.0 - beta);
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
    for (int k = 0; k < kBlock; ++k) a[k] = b.z[k] * Vec<A>(iT);
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
      for (int k = 0; k < kBlock; ++k) c[k] = v[k] * Vec<A>(iT);
      Lse<A> lv = Sv[t];
      lv.update(c, e);
      Sv[t] = lv;
      for (int k = 0; k < kBlock; ++k) e[k].store(sp[t] + j0 + k * W);
      lv.m.store(mv[t] + j0 / B * W);
    }
  });
  const double Lz = total(Sz).lse();
  const double L1 = ri.ce ? (ce_sep ? total(S1).lse() : Lz) : 0.0;
  const A nLz = A(-Lz);
  A nLv[kCap<MT>] = {}, cz[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    nLv[t] = A(-total(Sv[t]).lse());
    cz[t] = A(ri.g_kd[t] * (1.0 - beta) / T);
  }
  // per element: log q, log p, q, p, log m; zero probabilities contribute 0 (floors keep 0 * finite)
  LongSum<A> Kp[kCap<MT>], Kq[kCap<MT>];
  // (the student's values are computed with teacher 0, in the same loop: with one teacher this is
  // one fused loop per vector; q, log q and H are kept for the other teachers)
  sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
    const Vec<A> fz = vexp(Vec<A>::loadu(mz + j0 / B * W) + Vec<A>(nLz));
    Vec<A> q[kBlock], lq[kBlock], H[kBlock], p[kBlock], hp[kBlock];
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      const Vec<A> fv = vexp(Vec<A>::loadu(mv[t] + j0 / B * W) + Vec<A>(nLv[t]));
      Vec<A> kp = Kp[t].part, kq = Kq[t].part;
      for (int k = 0; k < kBlock; ++k) {
        if (t == 0) {
          lq[k] = finite_floor(vec::fmadd(b.z[k], Vec<A>(iT), Vec<A>(nLz)));
          q[k] = Vec<A>::loadu(sq + j0 + k * W) * fz;
        }
        const Vec<A> lp = finite_floor(vec::fmadd(v[k], Vec<A>(iT), Vec<A>(nLv[t])));
        p[k] = Vec<A>::loadu(sp[t] + j0 + k * W) * fv;
        const Vec<A> lm = finite_floor(vlog(vec::fmadd(p[k], Vec<A>(Ab), q[k] * Vec<A>(A1b))));
        hp[k] = lp - lm;
        const Vec<A> hq = lq[k] - lm;
        kp = vec::fmadd(p[k], hp[k], kp);
        kq = vec::fmadd(q[k], hq, kq);
        H[k] = t == 0 ? hq * Vec<A>(cz[t]) : vec::fmadd(hq, Vec<A>(cz[t]), H[k]);
      }
      Kp[t].part = kp;
      Kq[t].part = kq;
      Kp[t].end_block();
      Kq[t].end_block();
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
  out.CE = ri.ce ? L1 - ri.zy : 0.0;
  double KLp[kCap<MT>] = {}, Kqs = 0;
  for (int t = 0; t < teachers<MT>(r); ++t) {
    KLp[t] = Kp[t].total();
    const double KLq = Kq[t].total();
    out.D[t] = beta * KLp[t] + (1.0 - beta) * KLq;
    Kqs += double(cz[t]) * KLq;
  }
  if (!gz_on && !gv_on) return out;
  // dD/dq_k = (1 - beta)(log q_k - log m_k) (the p/m and q/m terms cancel), then the softmax chain
  // d q_k / d a_j = q_k (delta_jk - q_j), a = z / T:
  //   dD/dz_j = (1/T)(1 - beta) q_j (log q_j - log m_j - KLq),  dD/dv_j = (1/T) beta p_j (log p_j - log m_j - KLp)
  // M teachers, cz_t = g_t (1 - beta) / T: dz_j = q_j (H_j - sum_t cz_t KLq_t), H_j = sum_t cz_t (log q_j - log m_tj).
  // CE: g_ce (softmax(z)_j - [j = y]), softmax(z) = q when T == 1.
  A cv[kCap<MT>] = {}, nKp[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    cv[t] = A(ri.g_kd[t] * beta / T * r.w_v);
    nKp[t] = A(-KLp[t]);
  }
  const A nKq = A(-Kqs), nL1 = A(-L1), gce = A(ri.ce ? ri.g_ce : 0.0);
  Row<TZ, TV> rg = r;  // writes only: no loads of z, v (z only for CE's softmax at T = 1)
  rg.zp = nullptr;
  if (!(ce_sep && gz_on)) rg.z = nullptr;
  sweep<A>(rg, -1, true, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> gv[kBlock];  // a teacher's gradient block (locals: kept in registers)
    if (gz_on) {
      for (int k = 0; k < kBlock; ++k) {
        const int64_t o = j0 + k * W;
        const Vec<A> q = Vec<A>::loadu(sq + o), h = Vec<A>::loadu(sh + o);
        Vec<A> gz = q * (h + Vec<A>(nKq));
        if (ri.ce) gz = vec::fmadd(ce_sep ? vexp(b.z[k] + Vec<A>(nL1)) : q, Vec<A>(gce), gz);
        b.gz[k] = gz;
      }
      if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));
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
//   log p_k = lp_k                      (as given; T == 1, checked in Python; sum_k p_k may be < 1)
//   D = s * sum_k p_k (log p_k - a_{i_k} + Lz)    (terms with p_k = 0 are 0; s = T^2)
// Pass 1 is the student's lse only; the k teacher terms are a gather. Classes must be distinct; one
// outside [0, C) makes the row NaN (never read or written).
// ===================================================================================================
template <class A, class TZ, class TV>
RowOut row_topk(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri, int64_t i) {
  const A* lp = static_cast<const A*>(P.t_lp) + i * P.stk;
  const int64_t* idx = P.t_idx + i * P.sti;
  const int64_t K = P.K, C = r.C;
  const double T = P.ts;
  const A iT = A(1.0 / T);
  const bool ce_sep = ri.ce && T != 1.0;
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
    for (int k = 0; k < kBlock; ++k) a[k] = b.z[k] * Vec<A>(iT);
    Sz.update(a, e);
    if (ce_sep) S1.update(b.z, e);
  });
  const double Lz = total(Sz).lse();
  const double L1 = ri.ce ? (ce_sep ? total(S1).lse() : Lz) : 0.0;
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
  double* zk = scratch<double>(2 * K);
  double* pk = zk + K;
  double Pm = 0.0, S = 0.0;  // P = sum_k p_k, S = sum_k p_k (log p_k - a_{i_k})
  for (int64_t k = 0; k < K; ++k) {
    zk[k] = double(r.z[idx[k]]);
    // (-inf stays -inf: with no teacher mass in the row, Lt = -inf too, and p = 0 for every k)
    const double l = P.renormalize && lp[k] != -INFINITY ? double(lp[k]) / T - Lt : double(lp[k]);
    pk[k] = std::exp(l);
    if (pk[k] > 0 || std::isnan(l)) {
      Pm += pk[k];
      S += pk[k] * (l - zk[k] / T);
    }
  }
  const double s = P.scale;
  RowOut out;
  out.D[0] = s * (S + Pm * Lz);
  out.CE = ri.ce ? L1 - ri.zy : 0.0;
  if (!r.gz) return out;
  // dD/da_j = s (P q_j - sum_k p_k [i_k = j]), a = z / T:  dD/dz_j = (s / T)(P q_j - p_j [j in top-k]);
  // plus CE g_ce (softmax(z)_j - [j = y]), softmax(z) = q when T == 1. Dense part in the sweep, the
  // label column and the k teacher columns rewritten after it, in double.
  const double cp = ri.g_kd[0] * s / T;
  const A cq = A(cp * Pm + (ri.ce && !ce_sep ? ri.g_ce : 0.0));
  const A B1 = A(ce_sep ? ri.g_ce : 0.0), nLz = A(-Lz), nL1 = A(-L1);
  sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t, const auto&) {
    for (int k = 0; k < kBlock; ++k) {
      Vec<A> gz = vexp(vec::fmadd(b.z[k], Vec<A>(iT), Vec<A>(nLz))) * Vec<A>(cq);
      if (ce_sep) gz = vec::fmadd(vexp(b.z[k] + Vec<A>(nL1)), Vec<A>(B1), gz);
      b.gz[k] = gz;
    }
  });
  auto dense = [&](double zj) {
    return cp * Pm * std::exp(zj / T - Lz) + (ri.ce ? ri.g_ce * std::exp(zj - L1) : 0.0);
  };
  if (ri.ce) write_scalar(r.gz, ri.y, dense(ri.zy) - ri.g_ce);
  for (int64_t k = 0; k < K; ++k) {
    const double lab = ri.ce && idx[k] == ri.y ? ri.g_ce : 0.0;
    write_scalar(r.gz, idx[k], dense(zk[k]) - cp * pk[k] - lab);
  }
  return out;
}
