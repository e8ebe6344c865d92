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
  const double ce = ri.ce ? ce_value<A>(r, ri, t1) : 0.0;  // (before the sweep that may write over z)
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
  out.CE = ce;
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
