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
  out.CE = ri.ce ? ce_value<A>(r, ri, t1) : 0.0;
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

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
