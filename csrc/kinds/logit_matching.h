// The LM kind of the row kernel: logit matching (mean squared error of the centred logit differences).
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

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
  // The row's statistics (kdfast/_spec.py LMStat, LMTeacherStat): the sums of z and of each v, CE's
  // lse and the label logit; pass 1's (FUSED, STATS) or every rank's combined (FINISH).
  const int nt = teachers<MT>(r);
  double sz = 0, sv[kCap<MT>] = {}, zy = ri.zy;
  LseTotal t1 = {0.0, 1.0};
  if (P.phase == Phase::FINISH) {
    const RankStats g{P.gstats, P.N, P.KG, ri.i, P.world};
    sz = g.sum(lmstat::SUM_Z);
    for (int t = 0; t < nt; ++t) sv[t] = g.sum(lmstat::COUNT + t);
    if (ri.ce) t1 = g.lse(lmstat::M_ONE, lmstat::S_ONE), zy = g.sum(lmstat::Z_Y);
  } else if (P.center || ri.ce) {
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
    if (P.center) {
      sz = Szs.total();
      for (int t = 0; t < nt; ++t) sv[t] = Sd[t].total();
    }
    if (ri.ce) t1 = total(S1);
  }
  if (P.phase == Phase::STATS) {
    double* st = P.stats + ri.i * P.KS;
    st[lmstat::SUM_Z] = sz, st[lmstat::M_ONE] = t1.M, st[lmstat::S_ONE] = ri.ce ? t1.S : 0.0;
    st[lmstat::Z_Y] = ri.y >= 0 ? ri.zy : 0.0;
    for (int t = 0; t < nt; ++t) st[lmstat::COUNT + t] = sv[t];
    return RowOut{};
  }
  const bool finish = P.phase == Phase::FINISH;
  const double Cg = double(finish ? P.vocab : C);  // the whole row's columns
  RowOut out;
  RowInfo rig = ri;
  rig.zy = zy;
  double ce = 0.0;  // (before the sweep that may write over z)
  if (ri.ce && finish && ce_cancels(rig, t1)) out.a[nt] = 1.0, out.x[nt] = ce_tail<A>(r, rig, t1);
  else if (ri.ce) ce = ce_value<A>(r, rig, t1);
  // u_j = (z_j - zbar) - (v_j - vbar) (center) or z_j - v_j, D = sum u^2 / 2C:
  // dD/dz_j = u_j / C (the means' own derivatives sum to zero); dD/dv_j = -dD/dz_j;
  // dCE/dz_j = exp((z_j - M1) - l1) - [j = y] (M1 + l1 = lse(z), never rounded as one number). M teachers: dz = sum_t g_t (d_tj - dbar_t) / C.
  // (the means are rounded to A for the vector code; what the rounding took off, fix[t], is added
  // back to u: a constant shift of u would otherwise survive in the gradient, whose exact row sum is 0)
  A cz[kCap<MT>] = {}, cv[kCap<MT>] = {}, nvbar[kCap<MT>] = {}, fix[kCap<MT>] = {};
  const double zbar = P.center ? sz / Cg : 0.0;
  const A nzbar = A(-zbar);
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const double vbar = P.center ? sv[t] / Cg : 0.0;
    nvbar[t] = A(-vbar);
    fix[t] = A((-zbar - double(nzbar)) - (-vbar - double(nvbar[t])));
    cz[t] = A(ri.g_kd[t] / Cg);
    cv[t] = A(-ri.g_kd[t] / Cg * r.w_v);
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
  // FINISH: D is additive over the ranks (a = 0: the term is b + X)
  for (int t = 0; t < teachers<MT>(r); ++t) (finish ? out.x[t] : out.D[t]) = SS[t].total() / (2.0 * Cg);
  out.CE = ce;
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
