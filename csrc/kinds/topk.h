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
//
// P.divergence REVERSE / JSD (topk_reverse_kd, topk_jsd; docs/kernel-math.md, TOPK): the same
// support as two distributions P, Q over buckets b, each bucket's log-probabilities in double:
//   renormalize: the k finite entries, log P_k = (l_k / T - Mp) - log Sp, log Q_k = (a_k - Ma) - log Sa
//     (the student renormalised over K too: KL(Q || P) would be infinite against a teacher that is 0
//     outside K; from the k logits alone, a_k = z_k / T in double: pass 1 runs only for CE);
//   tail: the K entries, log P_k = l_k, log Q_k = (a_k - Mz) - lz, and (a non-K column with mass) the
//     tail bucket log Pt, log Qt; Q renormalised to sum 1 in double (removes the float lse's rounding,
//     common to every bucket).
//   REVERSE: D = s KL(Q || P) = s (sum_b Q_b phi(-d_b) + 1 - sum_b P_b),  d_b = log Q_b - log P_b
//   JSD:     D = s (beta sum_b P_b phi(-hp_b) + (1 - beta) sum_b Q_b phi(-hq_b)),  M = beta P + (1 - beta) Q,
//            hp = log P - log M, hq = log Q - log M
// phi(x) = e^x - 1 - x >= 0: sums of nonnegative terms (docs/kernel-math.md, rule 3), no cancellation
// when the loss is small. (Q e^{-d} = P, so Q phi(-d) = P - Q + Q d and sum_b Q_b phi(-d_b) =
// sum P - sum Q + KL(Q || P), sum Q = 1. JSD: P e^{-hp} = Q e^{-hq} = M, so the sum is
// beta (KLp - sum P + sum M) + (1 - beta)(KLq - sum Q + sum M) = D for any masses.) A rounding common
// to every log Q_b moves the phi form only to second order (the one-pass sum_b Q_b d_b to first).
// ===================================================================================================

// w phi(x) >= 0 given big = w e^x (from the logs: no overflow where w is tiny and x large): the series
// for |x| < 1/2 (phi), big - w (1 + x) above; w = 0 (this distribution has no mass on the bucket, or
// underflowed): big, the other's mass there (the identities above count it).
inline double wphi_big(double w, double x, double big) {
  if (w == 0.0) return big;
  return x > 0.5 ? big - w * (1.0 + x) : w * phi(x);
}

template <class A, class TZ, class TV>
RowOut row_topk(const KernelArgs& P, const Row<TZ, TV>& r, const RowInfo& ri, int64_t i) {
  const A* lp = static_cast<const A*>(P.t_lp) + i * P.stk;
  const int64_t* idx = P.t_idx + i * P.sti;
  const int64_t K = P.K, C = r.C;
  const double T = P.ts;
  const InvT<A> iT(T);
  const bool tail = P.tail;
  const bool fwd = P.divergence == Divergence::FORWARD;
  // the student's softmax over all C at T: the forward divergence's log q_{i_k} and tail's buckets
  // (reverse / JSD over the k renormalised entries read the k logits only: pass 1 then only for CE)
  const bool need_a = fwd || tail;
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
  if (need_a) {
    sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t, const auto&) {
      Vec<A> a[kBlock], e[kBlock];
      for (int k = 0; k < kBlock; ++k) a[k] = vscale(b.z[k], iT);
      Sz.update(a, e);
      if (ri.ce && T != 1.0) S1.update(b.z, e);
    });
  } else if (ri.ce) {  // reverse / JSD, renormalize: CE's lse(z) only
    sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t, const auto&) {
      Vec<A> e[kBlock];
      S1.update(b.z, e);
    });
  }
  // log q_j = (a_j - Mz) - lz (no rounded lse subtracted from a logit)
  const LseTotal tz = need_a ? total(Sz) : LseTotal{0.0, 1.0};
  const double Mz = tz.M, lz = tz.l();
  const LseTotal t1 = ri.ce ? (need_a && T == 1.0 ? tz : total(S1)) : LseTotal{0.0, 1.0};
  double Lt = 0.0;  // lse_k(lp / T): max first, then the sum (k is small: plain double loops)
  if (fwd && P.renormalize) {
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
  // (one scratch for all: a later, larger request could move it)
  double* zk = scratch<double>(6 * K + 3);
  double* pk = zk + K;
  double* lP = zk + 3 * K;  // reverse / JSD: per bucket log P_b, log Q_b, then the gradient weights
  double* lQ = lP + K + 1;
  double* wb = lQ + K + 1;
  double Pm = 0.0, S = 0.0;  // P = sum_k p_k, S = sum_k p_k (log p_k - log q_{i_k})
  for (int64_t k = 0; k < K; ++k) {
    zk[k] = double(r.z[idx[k]]);
    if (!fwd) continue;
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
  double Pt = 0.0, Mt = Mz, lt = -INFINITY, logQt = -INFINITY, Lp = -INFINITY;  // Lp = lse_K(lp)
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
      Lp = Ml + std::log(Sl);
      Pt = std::max(0.0, -std::expm1(Lp));
    } else {
      Pt = Ml == -INFINITY ? 1.0 : NAN;  // no finite entry: all the teacher's mass is in the tail
      Lp = Ml == -INFINITY ? -INFINITY : NAN;
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
    if (fwd && (Pt > 0 || std::isnan(Pt)) && lt > -INFINITY) S += Pt * (std::log(Pt) - logQt);
  }
  const bool has_t = tail && lt > -INFINITY;  // the tail bucket exists (a non-K column with mass)
  // ---- reverse / JSD over the buckets (header comment): D, and per bucket the gradient weight w_b
  // of dD/da_j = s w_b (q_j / Q_b) (derived below) ----
  int64_t nb = 0;
  if (!fwd) {
    double lPs = 0.0;  // log sum_b P_b: 0 up to rounding, but tail's Pt clamp / no tail bucket
    if (P.renormalize) {
      double Mp = -INFINITY, Ma = -INFINITY;
      for (int64_t k = 0; k < K; ++k)
        if (lp[k] != -INFINITY) Mp = std::max(Mp, double(lp[k]) / T), Ma = std::max(Ma, zk[k] / T);
      double Sp = 0.0, Sa = 0.0;
      for (int64_t k = 0; k < K; ++k)
        if (lp[k] != -INFINITY) Sp += std::exp(double(lp[k]) / T - Mp), Sa += std::exp(zk[k] / T - Ma);
      const double lsp = std::log(Sp), lsa = std::log(Sa);
      for (int64_t k = 0; k < K; ++k)  // exact at each maximum: log P = -log Sp there
        if (lp[k] != -INFINITY) lP[nb] = (double(lp[k]) / T - Mp) - lsp, lQ[nb++] = (zk[k] / T - Ma) - lsa;
    } else {
      for (int64_t k = 0; k < K; ++k)  // a_k rounded as its lane in the dense sweeps (exact at the max)
        if (lp[k] != -INFINITY) lP[nb] = double(lp[k]), lQ[nb++] = (scaled(zk[k], iT) - Mz) - lz;
      if (has_t) lP[nb] = std::log(Pt), lQ[nb++] = logQt;
      double Sq = 0.0;
      for (int64_t b = 0; b < nb; ++b) Sq += std::exp(lQ[b]);
      const double lq = std::log(Sq);
      for (int64_t b = 0; b < nb; ++b) lQ[b] -= lq;
      // sum P = e^Lp + Pt = max(e^Lp, 1) with the tail bucket (Pt clamped at 0), e^Lp without it
      lPs = has_t ? std::max(Lp, 0.0) : Lp;
    }
    const double beta = P.beta;
    const bool rev = P.divergence == Divergence::REVERSE;
    const double lb = rev ? 0.0 : std::log(beta), l1b = rev ? 0.0 : std::log1p(-beta);
    double X = 0.0, Sq = 0.0, Sw = 0.0;  // X: the phi sum; Sq, Sw: sum Q, sum Q w (the gradient's mean)
    for (int64_t b = 0; b < nb; ++b) {
      if (lP[b] == -INFINITY && lQ[b] == -INFINITY) {  // no mass on either side: adds nothing
        wb[b] = 0.0;
        continue;
      }
      const double Q = std::exp(lQ[b]), Pb = std::exp(lP[b]);
      double w;
      if (rev) {  // Q phi(-d), Q e^{-d} = P
        w = lQ[b] - lP[b];
        X += wphi_big(Q, -w, Pb);
      } else {
        // log space (rule 4): delta = log(beta P / ((1 - beta) Q)), sp(x) = log(1 + e^x),
        //   hq = -log(1 - beta) - sp(delta),  hp = -log beta - sp(-delta)
        // (sp(+-delta) from one log1p: not sp(-delta) = sp(delta) - delta, which cancels)
        const double delta = (lb - l1b) + (lP[b] - lQ[b]);
        const double L1 = std::log1p(std::exp(-std::abs(delta)));
        const double spd = std::max(delta, 0.0) + L1, spn = std::max(-delta, 0.0) + L1;
        const double M = std::exp(logaddexp(lb + lP[b], l1b + lQ[b]));
        X += beta * wphi_big(Pb, lb + spn, M) + (1.0 - beta) * wphi_big(Q, l1b + spd, M);
        w = spd;  // hq = -log(1 - beta) - spd: the constant drops out of hq - mean(hq)
      }
      wb[b] = w;
      if (Q > 0) Sq += Q, Sw += Q * w;
    }
    // reverse: KL = X + 1 - sum P; JSD: D = X
    S = rev ? X - std::expm1(lPs) : X;
    // Gradients. With g_b = Q_b dF/dQ_b and G = sum_b g_b, dF/da_j = sum_b g_b d log Q_b / da_j:
    //   renormalize: d log Q_k / da_j = [j = i_k] - Q_j [j in K]:     dF/da_j = g_j - Q_j G  (j in K), 0 else
    //   tail: d log q_k / da_j = [j = i_k] - q_j, d log Qt / da_j = q_j [j not in K] / Qt - q_j:
    //     dF/da_j = g_j - q_j G (j in K),  q_j (g_t / Qt - G) (j not in K)
    // reverse: dF/dQ_b = d_b + 1, g_b = Q_b (d_b + 1), G = KL + 1 (sum Q = 1): g_b - Q_b G = Q_b (d_b - KL)
    // JSD: dF/dQ_b = (1 - beta)(log Q_b - log M_b) (the P/M and Q/M terms cancel), G = (1 - beta) KL(Q || M):
    //   g_b - Q_b G = (1 - beta) Q_b (hq_b - KL(Q || M)) = (1 - beta) Q_b (mean(sp) - sp(delta_b))
    // So dD/da_j = s w_b (q_j / Q_b), b the bucket of class j, with w_b = Q_b (d_b - dbar) (reverse),
    // (1 - beta) Q_b (spbar - sp_b) (JSD), the means Q-weighted (KL = dbar: the loss's phi form is the
    // accurate value, the mean the one consistent with the d_b as computed: a rounding common to all
    // d_b cancels in d_b - dbar). q_j / Q_b = 1 on a K column; exp((a_j - Mt) - lt) on a tail column.
    const double mean = Sw / Sq;
    for (int64_t b = 0; b < nb; ++b) {
      const double Q = std::exp(lQ[b]);
      wb[b] = !(Q > 0) ? 0.0 : rev ? Q * (wb[b] - mean) : (1.0 - beta) * Q * (mean - wb[b]);
    }
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
  // reverse / JSD: dD/dz_j = (s / T) w_b (q_j / Q_b) (above): (s / T) w_b on a K column; with the
  // tail bucket t, a non-K column gets (s / T) w_t exp((a_j - Mt) - lt), the dense term of the
  // forward tail's form; renormalize: dD/dz_j = 0 outside K (the sweep writes CE's part, or zeros).
  const double cp = ri.g_kd[0] * s / T;
  const double Qt = tail ? std::exp(logQt) : 0.0;
  const double ct = !has_t ? 0.0 : fwd ? cp * (Qt - Pt) : cp * wb[nb - 1];
  const double qK = lt > -INFINITY ? 1.0 : Pm;  // q's factor on K: sum_k p_k + Pt = 1, or sum_k p_k alone
  const double dM = has_t ? Mt : Mz, dl = has_t ? lt : lz;
  auto ce_part = [&](double zj) { return ri.ce ? ri.g_ce * std::exp((zj - t1.M) - t1.l()) : 0.0; };
  const A nM1 = A(-t1.M), nl1 = A(-t1.l());
  if (need_a) {
    const A cq = A(tail ? ct : cp * Pm + (ri.ce && !ce_sep ? ri.g_ce : 0.0));
    const A B1 = A(ce_sep ? ri.g_ce : 0.0), nMz = A(-dM), nlz = A(-dl);
    sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t, const auto&) {
      for (int k = 0; k < kBlock; ++k) {
        Vec<A> gz = vexp((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz)) * Vec<A>(cq);
        if (ce_sep) gz = vec::fmadd(vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)), Vec<A>(B1), gz);
        b.gz[k] = gz;
      }
    });
  } else if (ri.ce) {  // reverse / JSD, renormalize: CE's softmax(z) g_ce outside K
    const A B1 = A(ri.g_ce);
    sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t, const auto&) {
      for (int k = 0; k < kBlock; ++k) b.gz[k] = vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)) * Vec<A>(B1);
    });
  } else {
    fill_row(r.gz, C, 0.0);
  }
  auto dense = [&](double zj) {  // the value the sweep wrote (tail: a non-K column's)
    const double kd = !need_a ? 0.0
                      : tail  ? ct * std::exp((scaled(zj, iT) - dM) - dl)
                              : cp * Pm * std::exp((scaled(zj, iT) - Mz) - lz);
    return kd + ce_part(zj);
  };
  if (ri.ce) write_scalar(r.gz, ri.y, dense(ri.zy) - ri.g_ce);
  int64_t b = 0;  // reverse / JSD: the bucket of the next finite entry
  for (int64_t k = 0; k < K; ++k) {
    const double lab = ri.ce && idx[k] == ri.y ? ri.g_ce : 0.0;
    if (!fwd) {
      if (lp[k] != -INFINITY) write_scalar(r.gz, idx[k], cp * wb[b++] + ce_part(zk[k]) - lab);
    } else if (!tail) {
      write_scalar(r.gz, idx[k], dense(zk[k]) - cp * pk[k] - lab);
    } else if (lp[k] != -INFINITY) {  // a K column: (s / T)(q_j - p_j); no tail bucket: (s / T)(P q_j - p_j)
      write_scalar(r.gz, idx[k], cp * (qK * std::exp((scaled(zk[k], iT) - Mz) - lz) - pk[k]) + ce_part(zk[k]) - lab);
    }  // (a padding entry's class keeps the sweep's value: a tail column, or reverse / JSD's outside K)
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
