// The TOPK kind of the row kernel: a sparse teacher given by its top-k log-probabilities (topk_kd).
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

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
  const InvT<A> iT(T);
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
    for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
    Sz.update(a, e);
    if (ce_sep) S1.update(b.z, e);
  });
  const LseTotal tz = total(Sz);  // log q_j = (a_j - Mz) - lz (no rounded lse subtracted from a logit)
  const double Mz = tz.M, lz = tz.l();
  const LseTotal t1 = ri.ce ? (ce_sep ? total(S1) : tz) : LseTotal{0.0, 1.0};
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
  RowOut out;
  out.D[0] = s * S;
  out.CE = ri.ce ? (t1.M - ri.zy) + t1.l() : 0.0;
  if (!r.gz) return out;
  // dD/da_j = s (P q_j - sum_k p_k [i_k = j]), a = z / T:  dD/dz_j = (s / T)(P q_j - p_j [j in top-k]);
  // plus CE g_ce (softmax(z)_j - [j = y]), softmax(z) = q when T == 1. Dense part in the sweep, the
  // label column and the k teacher columns rewritten after it, in double.
  const double cp = ri.g_kd[0] * s / T;
  const A cq = A(cp * Pm + (ri.ce && !ce_sep ? ri.g_ce : 0.0));
  const A B1 = A(ce_sep ? ri.g_ce : 0.0), nMz = A(-Mz), nlz = A(-lz), nM1 = A(-t1.M), nl1 = A(-t1.l());
  sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t, const auto&) {
    for (int k = 0; k < kBlock; ++k) {
      Vec<A> gz = vexp((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz)) * Vec<A>(cq);
      if (ce_sep) gz = vec::fmadd(vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)), Vec<A>(B1), gz);
      b.gz[k] = gz;
    }
  });
  auto dense = [&](double zj) {
    return cp * Pm * std::exp((scaled(zj, iT) - Mz) - lz) + (ri.ce ? ri.g_ce * std::exp((zj - t1.M) - t1.l()) : 0.0);
  };
  if (ri.ce) write_scalar(r.gz, ri.y, dense(ri.zy) - ri.g_ce);
  for (int64_t k = 0; k < K; ++k) {
    const double lab = ri.ce && idx[k] == ri.y ? ri.g_ce : 0.0;
    write_scalar(r.gz, idx[k], dense(zk[k]) - cp * pk[k] - lab);
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
