// The LS kind of the row kernel: logit standardisation (KD on the standardised logits).
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

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
  // the exponentials of passes 1 and 3 kept for pass 4 (ExpCache, as in row_kl): 0 the student's
  // (pass 3), 1 the teacher's (pass 3), 2 CE's (pass 1); one teacher, gradients asked for, C <= kCacheCols
  const bool cached = MT == 1 && (gz_on || gv_on) && C <= kCacheCols && P.phase == Phase::FUSED;
  const ExpCache<A> cache = cached ? ExpCache<A>(C, ri.ce ? 3 : 2) : ExpCache<A>();
  // Two phases (kdfast/_spec.py): passes 1 to 3 are the statistics rounds 0 to 2 (each from the
  // combined earlier rounds, kdfast/_spec.py LSStat), pass 4 the finish. `run(k)`: this call runs
  // pass k; otherwise its results come combined from gstats (rounds before this one).
  const int nt = teachers<MT>(r);
  const bool fused = P.phase == Phase::FUSED, finish = P.phase == Phase::FINISH;
  auto run = [&](int k) { return fused || (!finish && P.round == k); };
  const RankStats g{P.gstats, P.N, P.KG, ri.i, P.world};
  const int o1 = lmstat::COUNT + nt, o2 = o1 + 1 + nt;  // rounds 1 and 2's first columns
  double* const st = P.phase == Phase::STATS ? P.stats + ri.i * P.KS : nullptr;
  const double Cg = double(fused ? C : P.vocab);  // the whole row's columns
  Lse<A> S1;
  LongSum<A> Sz, Sv[kCap<MT>];
  double sum_z = 0, sum_v[kCap<MT>] = {}, zy = ri.zy;
  LseTotal t1{0.0, 1.0};
  // the means summed exactly (in double lanes, see row_lm)
  if (!run(0)) {
    sum_z = g.sum(lmstat::SUM_Z);
    for (int t = 0; t < nt; ++t) sum_v[t] = g.sum(lmstat::COUNT + t);
    if (ri.ce) t1 = g.lse(lmstat::M_ONE, lmstat::S_ONE), zy = g.sum(lmstat::Z_Y);
  } else {
    sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t j, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> e[kBlock];
      for (int k = 0; k < kBlock; ++k) Sz.add_exact(live_only(sp, b, k, b.z[k]));
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) Sv[t].add_exact(live_only(sp, b, k, v[k]));
        Sv[t].end_block();
      }
      if (ri.ce) {
        S1.update(b.z, e);
        if (cached) cache.put(2, j, e, S1.m);
      }
    });
    sum_z = Sz.total();
    for (int t = 0; t < nt; ++t) sum_v[t] = Sv[t].total();
    if (ri.ce) t1 = total(S1);
    if (st) {  // round 0 (LMStat's layout)
      st[lmstat::SUM_Z] = sum_z, st[lmstat::M_ONE] = t1.M, st[lmstat::S_ONE] = ri.ce ? t1.S : 0.0;
      st[lmstat::Z_Y] = ri.y >= 0 ? ri.zy : 0.0;
      for (int t = 0; t < nt; ++t) st[lmstat::COUNT + t] = sum_v[t];
      return RowOut{};
    }
  }  // (pass 1)
  // means rounded to A; fz / fv[t], what the rounding took off, are added back where a constant shift
  // of u would survive (the sigma terms of the gradients; the softmaxes do not see a shift)
  const double zbar = sum_z / Cg;
  const A nzbar = A(-zbar);
  const double fz = -zbar - double(nzbar);
  A nvbar[kCap<MT>] = {};
  double fv[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double vbar = sum_v[t] / Cg;
    nvbar[t] = A(-vbar);
    fv[t] = -vbar - double(nvbar[t]);
  }
  LongSum<A> Qz, Qv[kCap<MT>];
  double qz = 0, qv[kCap<MT>] = {};
  if (!run(1)) {
    qz = g.sum(o1);
    for (int t = 0; t < nt; ++t) qv[t] = g.sum(o1 + 1 + t);
  } else {
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
    qz = Qz.total();
    for (int t = 0; t < nt; ++t) qv[t] = Qv[t].total();
    if (st) {  // round 1: the centred squares
      st[0] = qz;
      for (int t = 0; t < nt; ++t) st[1 + t] = qv[t];
      return RowOut{};
    }
  }  // (pass 2)
  const double sz = std::sqrt(qz / (Cg - 1.0)), kz = eps + sz;
  const A iz = A(1.0 / (kz * T));
  double sv[kCap<MT>] = {}, kv[kCap<MT>] = {};
  A iv[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    sv[t] = std::sqrt(qv[t] / (Cg - 1.0));
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
  // pass 3's results in double (LSStat round 2): the lse of a and of each c, Qu at a's row max, and per
  // teacher Rr, W and PCu (shifted_sum, mass S and PUv), Pu and PUv at c's row max
  LseTotal ta{0, 0}, tc[kCap<MT>] = {};
  double QU = 0, Rr[kCap<MT>] = {}, Wd[kCap<MT>] = {}, PUd[kCap<MT>] = {}, PCUd[kCap<MT>] = {}, PUVd[kCap<MT>] = {};
  if (!run(2)) {
    ta = g.lse(o2 + lsstat::M_A, o2 + lsstat::S_A);
    QU = g.rescaled(o2 + lsstat::M_A, o2 + lsstat::S_A, o2 + lsstat::QU, ta);
    for (int t = 0; t < nt; ++t) {
      const int o = o2 + lsstat::COUNT + t * lsteacherstat::COUNT;
      namespace lt = lsteacherstat;
      tc[t] = g.lse(o + lt::M_C, o + lt::S_C);
      g.kl(o + lt::M_C, o + lt::S_C, o + lt::R, o + lt::W, tc[t], Rr[t], Wd[t]);
      PUd[t] = g.rescaled(o + lt::M_C, o + lt::S_C, o + lt::PU, tc[t]);
      PUVd[t] = g.rescaled(o + lt::M_C, o + lt::S_C, o + lt::PUV, tc[t]);
      PCUd[t] = g.shifted(o + lt::M_C, o + lt::S_C, o + lt::PUV, o + lt::R, o + lt::PCU, tc[t], Rr[t]);
    }
  } else {
    sweep<A>(r, -1, false, [&](auto sp, Block<A>& b, int64_t j, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      Vec<A> a[kBlock], c[kBlock], uz[kBlock], uv[kBlock], e[kBlock];
      for (int k = 0; k < kBlock; ++k) {
        uz[k] = live_only(sp, b, k, b.z[k] + Vec<A>(nzbar));
        a[k] = uz[k] * Vec<A>(iz);
        if constexpr (decltype(sp)::value)  // padding lanes: -inf, so that they add exp(-inf) = 0
          a[k] = Vec<A>::blendv(Vec<A>(ninf<A>()), a[k], b.live[k]);
      }
      const Vec<A> ra = La.update(a, e);
      if (cached) cache.put(0, j, e, La.m);
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
        if (cached) cache.put(1, j, e, Lc[0].m);  // (cached: one teacher, t = 0)
        const Vec<A> R1 = track_ref(R[t], c, a, Lc[t].m);
        const Vec<A> dmc = Lc[t].m - mc0, dR = R1 - R[t];
        R[t] = R1;
        Vec<A> w = shift_w(Wk[t], rc, sc0, dmc, dR), pu = Pu[t] * rc;
        Vec<A> pcu = shift_w(PCu[t], rc, puv0, dmc, dR), puv = PUv[t] * rc;
        for (int k = 0; k < kBlock; ++k) {
          const Vec<A> d = finite_floor(c[k] - Lc[t].m) - finite_floor(a[k] - R1);
          w = vec::fmadd(e[k], d, w);
          pu = vec::fmadd(e[k], uz[k], pu);
          if (gv_on || !fused) {  // (the statistics round cannot know whether the finish needs them)
            pcu = vec::fmadd(e[k] * d, uv[k], pcu);
            puv = vec::fmadd(e[k], uv[k], puv);
          }
        }
        Wk[t] = w, Pu[t] = pu, PCu[t] = pcu, PUv[t] = puv;
      }
    });
    ta = total(La);
    QU = rescaled_sum(Qu, La, ta);
    for (int t = 0; t < nt; ++t) {
      tc[t] = total(Lc[t]);
      Rr[t] = at_row_max(Lc[t], tc[t], R[t]);
      Wd[t] = shifted_sum(Wk[t], Lc[t].s, Lc[t], tc[t], R[t], Rr[t]);
      PUd[t] = rescaled_sum(Pu[t], Lc[t], tc[t]);
      PUVd[t] = rescaled_sum(PUv[t], Lc[t], tc[t]);
      PCUd[t] = shifted_sum(PCu[t], PUv[t], Lc[t], tc[t], R[t], Rr[t]);
    }
    if (st) {  // round 2
      namespace lt = lsteacherstat;
      st[lsstat::M_A] = ta.M, st[lsstat::S_A] = ta.S, st[lsstat::QU] = QU;
      for (int t = 0; t < nt; ++t) {
        double* o = st + lsstat::COUNT + t * lt::COUNT;
        o[lt::M_C] = tc[t].M, o[lt::S_C] = tc[t].S, o[lt::R] = Rr[t], o[lt::W] = Wd[t];
        o[lt::PU] = PUd[t], o[lt::PCU] = PCUd[t], o[lt::PUV] = PUVd[t];
      }
      return RowOut{};
    }
  }  // (pass 3)
  const double lz = ta.l();
  RowOut out;
  RowInfo rig = ri;  // (the label logit: combined over the ranks in FINISH)
  rig.zy = zy;
  if (ri.ce && finish && ce_cancels(rig, t1)) out.a[nt] = 1.0, out.x[nt] = ce_tail<A>(r, rig, t1);
  else out.CE = ri.ce ? ce_value<A>(r, rig, t1) : 0.0;
  double Mv[kCap<MT>] = {}, lv[kCap<MT>] = {}, dbar[kCap<MT>] = {}, KL1[kCap<MT>] = {};
  bool refine = false, rf[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    Mv[t] = tc[t].M, lv[t] = tc[t].l();
    dbar[t] = Wd[t] / tc[t].S;
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
  const double Qs = QU / ta.S;
  double cus = 0;
  A cq[kCap<MT>] = {}, cp[kCap<MT>] = {}, cuv[kCap<MT>] = {}, fcuv[kCap<MT>] = {}, nMv[kCap<MT>] = {}, nlv[kCap<MT>] = {};
  A ndbar[kCap<MT>] = {}, E[kCap<MT>] = {}, nR[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    nR[t] = A(-Rr[t]);
    const double Gz = T * (Qs - PUd[t] / tc[t].S);
    const double Gv = T * (PCUd[t] / tc[t].S - dbar[t] * PUVd[t] / tc[t].S);
    const double g = ri.g_kd[t], gv = ri.g_kd[t] * r.w_v;
    cq[t] = A(g * T / kz);
    cus += sz > 0 ? -g * Gz / (kz * kz * (Cg - 1.0) * sz) : 0.0;
    cp[t] = A(gv * T / kv[t]);
    cuv[t] = A(sv[t] > 0 ? -gv * Gv / (kv[t] * kv[t] * (Cg - 1.0) * sv[t]) : 0.0);
    fcuv[t] = A(fv[t] * double(cuv[t]));
    nMv[t] = A(-Mv[t]);
    nlv[t] = A(-lv[t]);
    ndbar[t] = A(-dbar[t]);
    E[t] = A(rf[t] ? std::exp(KL1[t]) : 0.0);
  }
  const A Acu = A(cus), fAcu = A(fz * cus);
  const A nMz = A(-ta.M), nlz = A(-lz), nM1 = A(-t1.M), nl1 = A(-t1.l()), gce = A(ri.ce ? ri.g_ce : 0.0);
  LongSum<A> X[kCap<MT>];
  // cached: q_j = ez_j * fq, p_j = ev_j * fp, softmax(z)_j = e1_j * f1 (ExpRead: the factors per block)
  ExpRead<A> Rq(ta.M, lz), Rp(Mv[0], lv[0]), R1(t1.M, t1.l());
  sweep<A>(r, -1, gz_on || gv_on, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
    Vec<A> v[kBlock], gv[kBlock];  // the current teacher's block and gradient (locals: kept in registers)
    Vec<A> q[kBlock], a[kBlock];
    Vec<A> fq, fp, f1;
    if (cached) {
      fq = Rq.factor(cache.max(0, j0));
      fp = Rp.factor(cache.max(1, j0));
      if (ri.ce) f1 = R1.factor(cache.max(2, j0));
    }
    // the student's terms, once; CE's -1 at the label before the small KD terms are added (added
    // after them, the rounding of g_ce (softmax - 1) + small would be at g_ce's scale)
    for (int k = 0; k < kBlock; ++k) {
      const Vec<A> uz = b.z[k] + Vec<A>(nzbar);
      a[k] = uz * Vec<A>(iz);
      q[k] = cached ? cache.get(0, j0, k) * fq : vexp((a[k] + Vec<A>(nMz)) + Vec<A>(nlz));
      const Vec<A> s1 = !ri.ce ? Vec<A>(A(0))
                        : cached ? cache.get(2, j0, k) * f1 : vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1));
      b.gz[k] = s1 * Vec<A>(gce);
    }
    if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));
    for (int k = 0; k < kBlock; ++k)
      b.gz[k] = vec::fmadd(b.z[k] + Vec<A>(nzbar), Vec<A>(Acu), b.gz[k] + Vec<A>(fAcu));
    for (int t = 0; t < teachers<MT>(r); ++t) {
      io.load(t, v);
      for (int k = 0; k < kBlock; ++k) {
        const Vec<A> uv = v[k] + Vec<A>(nvbar[t]);
        const Vec<A> xc = uv * Vec<A>(iv[t]) + Vec<A>(nMv[t]);
        const Vec<A> p = cached ? cache.get(1, j0, k) * fp : vexp(xc + Vec<A>(nlv[t]));
        const Vec<A> u = (finite_floor(xc) - finite_floor(a[k] + Vec<A>(nR[t]))) + Vec<A>(ndbar[t]);
        b.gz[k] = vec::fmadd(q[k] - p, Vec<A>(cq[t]), b.gz[k]);
        gv[k] = vec::fmadd(p * u, Vec<A>(cp[t]), vec::fmadd(uv, Vec<A>(cuv[t]), Vec<A>(fcuv[t])));
        if (refine) X[t].add(phi_term(p, u, q[k], Vec<A>(E[t])));
      }
      if (refine) X[t].end_block();
      io.store(t, gv);
    }
  });
  for (int t = 0; t < teachers<MT>(r); ++t) {
    if (!rf[t]) continue;
    if (finish) out.D[t] = 0.0, out.a[t] = T * T, out.x[t] = X[t].total();  // T^2 log1p of the ranks' sum
    else out.D[t] = T * T * std::log1p(X[t].total());
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
