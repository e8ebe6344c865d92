// The KL kind of the row kernel: kd, ttm, wttm, retro_kd and jsd at beta in {0, 1} (forward and reverse
// KL, single and multi-teacher).
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

// ===================================================================================================
// KL kind: D = s * KL(p || q) (or s * KL(q || p) when Rev), p = softmax(v / Tt), q = softmax(z / Ts).
// kd, ttm, wttm (s = U), retro_kd (teacher row mixed with zp), jsd at beta in {0, 1}.
// Multi-teacher (every kind): D_t per teacher t, the student's statistics once, each teacher's per
// teacher; the student gradient is the sum over t of the single-teacher expressions, weighted g_kd[t].
// ===================================================================================================
template <bool Rev, int MT, class A, class TZ, class TV>
RowOut row_kl(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri) {
  const InvT<A> its(P.ts), itt(P.tt);
  const bool ce_sep = ri.ce && P.ts != 1.0;  // CE needs lse(z) at T = 1: its own stream unless Ts == 1
  const bool wttm = P.wttm;
  Lse<A> Sz, S1, Sv[kCap<MT>], Sv1[kCap<MT>];
  Vec<A> W[kCap<MT>], R[kCap<MT>];
  for (int t = 0; t < teachers<MT>(r); ++t) W[t] = R[t] = Vec<A>(A(0));
  const bool grads = r.gz || r.gv[0];
  // CE at Ts = 2 or 4: its stream is the student's raised to the power Ts (z/Ts is exact, so
  // exp(z - Ts m) = exp(z/Ts - m)^Ts and max(z) = Ts max(z/Ts)): no exponential of its own. S1's
  // lanes are then kept at the maxima Ts * Sz.m: s1 = s1 * rz^Ts + sum_k ez_k^Ts.
  const int ce_pow = ce_sep && its.lo == A(0) && (P.ts == 2.0 || P.ts == 4.0) ? int(P.ts) : 0;
  Vec<A> s1p(A(0));
  // pass 1's exponentials kept for pass 2 (ExpCache): one teacher, gradients asked for, C <= kCacheCols.
  // Streams: 0 the student's (a), 1 the teacher's (c), 2 CE's (z) unless ce_pow derives it from 0.
  const bool cached = MT == 1 && grads && r.C <= kCacheCols && P.phase == Phase::FUSED;
  const ExpCache<A> cache = cached ? ExpCache<A>(r.C, ce_sep && !ce_pow ? 3 : 2) : ExpCache<A>();
  // Pass 1 (statistics): both online lse, and per teacher W = sum_j e_j d_j (docs/kernel-math.md, "KL"):
  // forward e_j = exp(c_j - m_v), d_j = (c_j - m_v) - (a_j - R), R the student's value where the
  // teacher has its lane max; Rev: e_j = exp(a_j - m_z), d_j = (a_j - m_z) - (c_j - R), R the teacher's
  // value at the student's lane max. W is shifted when the maxima and references move (shift_w). d is
  // free of the logits' offsets and 0 at the weighting stream's largest entry. Both operands are
  // floored: a lane where both are -inf (padding, or a column -inf in both rows) adds 0 * finite.
  // The row's statistics in double (KLStats): from pass 1's lanes (FUSED, STATS) or combined over the
  // ranks (FINISH)
  KLStats<MT> st;
  st.zy = ri.zy;
  for (int t = 0; t < teachers<MT>(r); ++t) st.vy[t] = ri.vy[t];
  if (P.phase == Phase::FINISH) {
    st.combine(RankStats{P.gstats, P.N, P.KG, ri.i, P.world}, teachers<MT>(r), ri.ce, ce_sep, Rev, wttm);
  } else {
    sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> a[kBlock], c[kBlock], ez[kBlock], e[kBlock], xa[kBlock];
      for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], its);
      const Vec<A> mz0 = Sz.m, sz0 = Sz.s;
      const Vec<A> rz = Sz.update(a, ez);
      if (cached) cache.put(0, j, ez, Sz.m);
      if (ce_pow) {
        Vec<A> acc = s1p * vpow(rz, ce_pow);
        for (int k = 0; k < kBlock; ++k) acc = acc + vpow(ez[k], ce_pow);
        s1p = acc;
      } else if (ce_sep) {
        S1.update(b.z, e);
        if (cached) cache.put(2, j, e, S1.m);
      }
      if constexpr (Rev)
        for (int k = 0; k < kBlock; ++k) xa[k] = finite_floor(a[k] - Sz.m);
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) c[k] = vscale(v[k], itt);
        const Vec<A> mv0 = Sv[t].m, sv0 = Sv[t].s;
        const Vec<A> rv = Sv[t].update(c, e);
        if (cached) cache.put(1, j, e, Sv[0].m);  // (cached: one teacher, t = 0)
        if constexpr (Rev) {
          const Vec<A> R1 = track_ref(R[t], a, c, Sz.m);
          Vec<A> w = shift_w(W[t], rz, sz0, Sz.m - mz0, R1 - R[t]);
          for (int k = 0; k < kBlock; ++k) w = vec::fmadd(ez[k], xa[k] - finite_floor(c[k] - R1), w);
          W[t] = w, R[t] = R1;
        } else {
          const Vec<A> R1 = track_ref(R[t], c, a, Sv[t].m);
          Vec<A> w = shift_w(W[t], rv, sv0, Sv[t].m - mv0, R1 - R[t]);
          for (int k = 0; k < kBlock; ++k)
            w = vec::fmadd(e[k], finite_floor(c[k] - Sv[t].m) - finite_floor(a[k] - R1), w);
          W[t] = w, R[t] = R1;
        }
        if (wttm) Sv1[t].update(v, e);
      }
    });
    if (ce_pow) {  // S1's lanes at the maxima Ts * Sz.m (exact: Ts is a power of two)
      S1.m = vec::maximum(Sz.m * Vec<A>(A(ce_pow)), Vec<A>(lowest<A>()));
      S1.s = s1p;
    }
    st.z = total(Sz);
    st.one = st.z;
    if (ri.ce && ce_sep) st.one = total(S1);
    for (int t = 0; t < teachers<MT>(r); ++t) {
      st.v[t] = total(Sv[t]);
      if constexpr (Rev) {
        st.R[t] = at_row_max(Sz, st.z, R[t]);
        st.W[t] = shifted_sum(W[t], Sz.s, Sz, st.z, R[t], st.R[t]);
      } else {
        st.R[t] = at_row_max(Sv[t], st.v[t], R[t]);
        st.W[t] = shifted_sum(W[t], Sv[t].s, Sv[t], st.v[t], R[t], st.R[t]);
      }
      if (wttm) st.u[t] = total(Sv1[t]);
    }
    if (P.phase == Phase::STATS) {  // phase 1 ends here: the local statistics
      st.store(P.stats + ri.i * P.KS, teachers<MT>(r), ri.ce, ri.y >= 0);
      return RowOut{};
    }
  }  // (pass 1)
  const LseTotal tz = st.z, t1 = ri.ce ? st.one : st.z;
  const double lz = tz.l();
  RowOut out;
  const bool finish = P.phase == Phase::FINISH;
  RowInfo rig = ri;  // (the label logits: combined over the ranks in FINISH)
  rig.zy = st.zy;
  for (int t = 0; t < teachers<MT>(r); ++t) rig.vy[t] = st.vy[t];
  if (ri.ce && finish && ce_cancels(rig, t1)) {  // log1p of the ranks' summed parts
    out.a[teachers<MT>(r)] = 1.0;
    out.x[teachers<MT>(r)] = ce_tail<A>(r, rig, t1);
  } else {
    out.CE = ri.ce ? ce_value<A>(r, rig, t1) : 0.0;
  }
  // per teacher: the row maxima and log S, the reference Rr (forward: a at the teacher's argmax; Rev: c
  // at the student's), dbar, the one-pass KL1 and the scale s (wttm: U = exp(lse(v/T) - lse(v)/T), a
  // per-row constant, no gradient through it). log p_j - log q_j = d_j + (M_z - Rr) - (l_v - l_z), so
  //   KL1 = dbar + (M_z - Rr) - (l_v - l_z);   Rev: KL1 = dbar + (M_v - Rr) - (l_z - l_v).
  double Mv[kCap<MT>] = {}, lv[kCap<MT>] = {}, Rr[kCap<MT>] = {}, dbar[kCap<MT>] = {}, KL1[kCap<MT>] = {};
  double s[kCap<MT>] = {};
  bool refine = false, rf[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    Mv[t] = st.v[t].M, lv[t] = st.v[t].l(), Rr[t] = st.R[t];
    double off;
    if constexpr (Rev) {
      dbar[t] = st.W[t] / tz.S;
      off = (st.v[t].M - Rr[t]) - (lz - lv[t]);
    } else {
      dbar[t] = st.W[t] / st.v[t].S;
      off = (tz.M - Rr[t]) - (lv[t] - lz);
    }
    KL1[t] = dbar[t] + off;
    if (wttm) {
      // lse(v/T) - lse(v)/T = (max(v)/T + l_v) - (max(v) + l_1v)/T = l_v - l_1v/T: the maxima cancel
      // exactly (their roundings, fl(max(v) / T) against max(v) / T, would not)
      s[t] = std::exp(lv[t] - st.u[t].l() / P.tt);
    } else {
      s[t] = P.scale;
    }
    out.D[t] = s[t] * KL1[t];
    // cancellation in KL1 costs more than 3 bits: the accurate sum of the gradient pass (log1p of
    // nonnegative terms), in a sweep of its own for a forward-only call
    rf[t] = needs_refine(KL1[t], std::abs(dbar[t]) + 1.0);
    refine |= rf[t];
  }
  if (!grads && !refine) return out;

  // Pass 2: gradients, and the accurate KL. With d_j, dbar as above relative to the row maxima and
  // u_j = d_j - dbar (sum_j p_j u_j = 0; Rev: weights q):
  //   log p_j - log q_j - KL = (d_j - (l_v - l_z)) - (dbar - (l_v - l_z)) = u_j
  // so (forward) dD/dz_j = (s/Ts)(q_j - p_j)                 [d log q_k / d a_j = delta_jk - q_j]
  //              dD/dv_j = (s/Tt) p_j (log p_j - log q_j - KL) = (s/Tt) p_j u_j   [d p_k / d c_j = p_k(delta_jk - p_j)]
  // Rev (KL(q||p)): dD/dz_j = (s/Ts) q_j u_j, dD/dv_j = (s/Tt)(p_j - q_j).
  // q_j = exp((a_j - M_z) - l_z), p_j = exp((c_j - M_v) - l_v): no rounded lse is subtracted from a logit.
  // KL = log1p(sum_j p_j phi(-u_j)) (phi_term; Rev: q weights), accurate relative to its own size.
  // dCE/dz_j = softmax(z)_j - [j = y]: the softmax part here (= q_j when Ts == 1), the -1 below.
  // Every constant (grad_scale, kd_w, s / T, retro's 1 - rho) is folded into one coefficient per
  // teacher; with M teachers dz sums them: forward q_j Bq + sum_t Az_t (q_j - p_tj) (the difference
  // first: where q ~ p, rounding the two products apart would cost the difference its precision).
  A Az[kCap<MT>] = {}, Av[kCap<MT>] = {}, nMv[kCap<MT>] = {}, nlv[kCap<MT>] = {}, nR[kCap<MT>] = {};
  A ndbar[kCap<MT>] = {}, E[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    Az[t] = A(ri.g_kd[t] * s[t] / P.ts);
    Av[t] = A(ri.g_kd[t] * s[t] / P.tt * r.w_v);
    nMv[t] = A(-Mv[t]);
    nlv[t] = A(-lv[t]);
    nR[t] = A(-Rr[t]);
    ndbar[t] = A(-dbar[t]);
    E[t] = A(rf[t] ? std::exp(KL1[t]) : 0.0);
  }
  const A Bq = A(ri.ce && !ce_sep ? ri.g_ce : 0.0);  // CE folded into the q coefficient (Ts == 1)
  const A B1 = A(ce_sep ? ri.g_ce : 0.0);
  const A nMz = A(-tz.M), nlz = A(-lz), nM1 = A(-t1.M), nl1 = A(-t1.l());
  LongSum<A> X[kCap<MT>];
  // cached: q_j = ez_j * fz, p_j = ev_j * fv, softmax(z)_j = e1_j * f1 (e1 = ez^Ts with ce_pow), the
  // factors per block (ExpRead)
  ExpRead<A> Rz(tz.M, lz), Rv(Mv[0], lv[0]), R1(t1.M, t1.l());
  // (the student's terms are computed with teacher 0, in the same loop: with one teacher this is the
  // single fused loop per vector; q is kept for the other teachers)
  sweep<A>(r, -1, grads, [&](auto, Block<A>& b, int64_t j, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    Vec<A> q[kBlock], a[kBlock], xa[kBlock];
    Vec<A> fz, fv, f1;
    if (cached) {
      const Vec<A> mzb = cache.max(0, j);
      fz = Rz.factor(mzb);
      fv = Rv.factor(cache.max(1, j));
      if (ce_sep) f1 = R1.factor(ce_pow ? mzb * Vec<A>(A(ce_pow)) : cache.max(2, j));
    }
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        if (t == 0) {
          a[k] = vscale(b.z[k], its);
          xa[k] = a[k] + Vec<A>(nMz);
          const Vec<A> ez = cached ? cache.get(0, j, k) : Vec<A>(A(0));
          q[k] = cached ? ez * fz : vexp(xa[k] + Vec<A>(nlz));
          xa[k] = finite_floor(xa[k]);
          Vec<A> gz = q[k] * Vec<A>(Bq);
          if (ce_sep) {
            const Vec<A> s1 = !cached ? vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1))
                              : (ce_pow ? vpow(ez, ce_pow) : cache.get(2, j, k)) * f1;
            gz = vec::fmadd(s1, Vec<A>(B1), gz);
          }
          b.gz[k] = gz;
        }
        const Vec<A> c = vscale(v[k], itt);
        const Vec<A> p = cached ? cache.get(1, j, k) * fv : vexp((c + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
        if constexpr (!Rev) {
          const Vec<A> u = (finite_floor(c + Vec<A>(nMv[t])) - finite_floor(a[k] + Vec<A>(nR[t]))) + Vec<A>(ndbar[t]);
          b.gz[k] = vec::fmadd(q[k] - p, Vec<A>(Az[t]), b.gz[k]);
          gv[k] = p * Vec<A>(Av[t]) * u;
          if (refine) X[t].add(phi_term(p, u, q[k], Vec<A>(E[t])));
        } else {
          const Vec<A> u = (xa[k] - finite_floor(c + Vec<A>(nR[t]))) + Vec<A>(ndbar[t]);
          b.gz[k] = vec::fmadd(q[k] * Vec<A>(Az[t]), u, b.gz[k]);
          gv[k] = (p - q[k]) * Vec<A>(Av[t]);
          if (refine) X[t].add(phi_term(q[k], u, p, Vec<A>(E[t])));
        }
      }
      if (refine) X[t].end_block();
      io.store(t, gv);
    }
  });
  for (int t = 0; t < teachers<MT>(r); ++t) {
    if (!rf[t]) continue;
    if (finish)  // s log1p of the ranks' sum (a = s = 0: the term is 0 + X, so X = 0 then)
      out.D[t] = 0.0, out.a[t] = s[t], out.x[t] = s[t] != 0.0 ? X[t].total() : 0.0;
    else out.D[t] = s[t] * std::log1p(X[t].total());
  }
  if (ri.ce && r.gz && ri.y >= 0) {  // the label column (this rank's), recomputed in double from values read before any write
    const double ay = scaled(ri.zy, its), q = std::exp((ay - tz.M) - lz);
    double g = ri.g_ce * (std::exp((ri.zy - t1.M) - t1.l()) - 1.0);
    for (int t = 0; t < teachers<MT>(r); ++t) {
      const double cy = scaled(ri.vy[t], itt), p = std::exp((cy - Mv[t]) - lv[t]);
      g += Rev ? double(Az[t]) * q * (((ay - tz.M) - (cy - Rr[t])) - dbar[t]) : double(Az[t]) * (q - p);
    }
    write_scalar(r.gz, ri.y, g);
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
