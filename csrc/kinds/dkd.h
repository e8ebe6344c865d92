// The DKD kind of the row kernel (decoupled KD: target / non-target parts split at the label).
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

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
  const bool grads = r.gz || r.gv[0];
  // pass 1's exponentials kept for pass 2 (ExpCache, as in row_kl): 0 the student's, 1 the teacher's,
  // 2 CE's; one teacher, gradients asked for, C <= kCacheCols
  const bool cached = MT == 1 && grads && r.C <= kCacheCols && P.phase == Phase::FUSED;
  const ExpCache<A> cache = cached ? ExpCache<A>(r.C, ce_sep ? 3 : 2) : ExpCache<A>();
  // The row's statistics over j != y (KLStats, without wttm's): pass 1's (FUSED, STATS) or every rank's
  // combined (FINISH: y is -1 where another rank holds the label, and the label logits come combined)
  KLStats<MT> st;
  st.zy = ri.zy;
  for (int t = 0; t < teachers<MT>(r); ++t) st.vy[t] = ri.vy[t];
  if (P.phase == Phase::FINISH) {
    st.combine(RankStats{P.gstats, P.N, P.KG, ri.i, P.world}, teachers<MT>(r), ri.ce, ce_sep, false, false);
  } else {
    // W = sum_{j != y} exp(c_j - m_v) d_j, d_j = (c_j - m_v) - (a_j - R), R the student's value at the
    // teacher's lane max, as in the KL kind (shifted when the lane maxima and references move)
    sweep<A>(r, y, false, [&](auto, Block<A>& b, int64_t j, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> a[kBlock], c[kBlock], e[kBlock];
      for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
      Sz.update(a, e);
      if (cached) cache.put(0, j, e, Sz.m);
      if (ce_sep) {
        S1.update(b.z, e);
        if (cached) cache.put(2, j, e, S1.m);
      }
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) c[k] = vscale(v[k], iT);
        const Vec<A> mv0 = Sv[t].m, sv0 = Sv[t].s;
        const Vec<A> rv = Sv[t].update(c, e);
        if (cached) cache.put(1, j, e, Sv[0].m);  // (cached: one teacher, t = 0)
        const Vec<A> R1 = track_ref(R[t], c, a, Sv[t].m);
        Vec<A> w = shift_w(W[t], rv, sv0, Sv[t].m - mv0, R1 - R[t]);
        for (int k = 0; k < kBlock; ++k)
          w = vec::fmadd(e[k], finite_floor(c[k] - Sv[t].m) - finite_floor(a[k] - R1), w);
        W[t] = w, R[t] = R1;
      }
    });
    st.z = total(Sz);
    if (ri.ce) st.one = ce_sep ? total(S1) : st.z;
    for (int t = 0; t < teachers<MT>(r); ++t) {
      st.v[t] = total(Sv[t]);
      if (st.v[t].S > 0) {
        st.R[t] = at_row_max(Sv[t], st.v[t], R[t]);
        st.W[t] = shifted_sum(W[t], Sv[t].s, Sv[t], st.v[t], R[t], st.R[t]);
      }
    }
    if (P.phase == Phase::STATS) {  // phase 1 ends here
      st.store(P.stats + ri.i * P.KS, teachers<MT>(r), ri.ce, y >= 0);
      return RowOut{};
    }
  }  // (pass 1)
  const bool finish = P.phase == Phase::FINISH;
  const LseTotal tz = st.z;  // over j != y
  const double lzn = tz.l(), Lzn = tz.lse();
  const double ay = scaled(st.zy, iT);
  const double Lz = logaddexp(Lzn, ay);
  const double lqy = ay - Lz, l1qy = Lzn - Lz, qy = std::exp(lqy), qy1 = std::exp(l1qy);
  // CE's lse(z) at T = 1: its own stream (over j != y) or the student's (T == 1), plus the label column
  LseTotal t1{0.0, 1.0}, s1{0.0, 0.0};
  if (ri.ce) {
    s1 = st.one;
    const double M = std::max(s1.M, st.zy);
    t1 = {M, s1.S * std::exp(s1.M - M) + std::exp(st.zy - M)};
  }
  RowOut out;
  // S1 runs over j != y: with the label at the max, CE = log1p of the other classes' mass, which does
  // not cancel when CE is small (see ce_value)
  out.CE = !ri.ce ? 0.0
         : st.zy == t1.M ? std::log1p(s1.S > 0.0 ? s1.S * std::exp(s1.M - t1.M) : 0.0)
                         : (t1.M - st.zy) + t1.l();
  // per teacher: Lv\y (max and log S), the reference Rr (a at the teacher's argmax over j != y), dbar,
  // NCKD1 = dbar + (M_z\y - Rr) - (l_v\y - l_z\y), p_y, 1 - p_y, G p_y
  double Mvn[kCap<MT>] = {}, lvn[kCap<MT>] = {}, Rr[kCap<MT>] = {}, dbar[kCap<MT>] = {}, NCKD1[kCap<MT>] = {};
  double py[kCap<MT>] = {}, py1[kCap<MT>] = {}, Gp[kCap<MT>] = {}, TCKD[kCap<MT>] = {};
  bool refine = false, rf[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const LseTotal tv = st.v[t];
    Mvn[t] = tv.M, lvn[t] = tv.l();
    const double Lvn = tv.lse();
    const double cy = scaled(st.vy[t], iT);
    const double Lv = logaddexp(Lvn, cy);
    // NCKD = KL(p_hat || q_hat) over j != y (0 if the teacher has no non-target mass)
    if (tv.S > 0) {
      Rr[t] = st.R[t];
      dbar[t] = st.W[t] / tv.S;
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
  // cached: q_hat_j = ez_j * fz, p_hat_j = ev_j * fv, softmax(z)_j = e1_j * f1 (ExpRead: the factors
  // per block)
  ExpRead<A> Rz(tz.M, lzn), Rv(Mvn[0], lvn[0]), R1(t1.M, t1.l());
  sweep<A>(r, y, grads, [&](auto, Block<A>& b, int64_t j, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    Vec<A> qh[kBlock], a[kBlock];
    Vec<A> fz, fv, f1;
    if (cached) {
      fz = Rz.factor(cache.max(0, j));
      fv = Rv.factor(cache.max(1, j));
      if (ce_sep) f1 = R1.factor(cache.max(2, j));
    }
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        if (t == 0) {  // the student's terms, once
          a[k] = vscale(b.z[k], iT);
          qh[k] = cached ? cache.get(0, j, k) * fz : vexp((a[k] + Vec<A>(nMzn)) + Vec<A>(nlzn));
          Vec<A> gz = qh[k] * Vec<A>(Aq);
          if (ce_sep)
            gz = vec::fmadd(cached ? cache.get(2, j, k) * f1 : vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)),
                            Vec<A>(B1), gz);
          b.gz[k] = gz;
        }
        const Vec<A> xc = vscale(v[k], iT) + Vec<A>(nMvn[t]);
        const Vec<A> ph = cached ? cache.get(1, j, k) * fv : vexp(xc + Vec<A>(nlvn[t]));
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
  for (int t = 0; t < teachers<MT>(r); ++t) {
    if (!rf[t]) continue;
    if (finish)  // T^2 (alpha TCKD + beta log1p(X)), X summed over the ranks
      out.D[t] = T * T * P.alpha * TCKD[t], out.a[t] = T * T * P.beta, out.x[t] = P.beta != 0.0 ? X[t].total() : 0.0;
    else
      out.D[t] = T * T * (P.alpha * TCKD[t] + P.beta * std::log1p(X[t].total()));
  }
  if (y < 0) return out;  // (another rank holds the label column)
  // the label column (its lane in the block above held padding): recomputed in double
  if (r.gz) {
    double g = ri.ce ? ri.g_ce * (std::exp((ri.zy - t1.M) - t1.l()) - 1.0) : 0.0;
    for (int t = 0; t < teachers<MT>(r); ++t) g += T * ri.g_kd[t] * P.alpha * (qy - py[t]);
    write_scalar(r.gz, y, g);
  }
  for (int t = 0; t < teachers<MT>(r); ++t) write_scalar(r.gv[t], y, T * ri.g_kd[t] * r.w_v * P.alpha * Gp[t] * py1[t]);
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
