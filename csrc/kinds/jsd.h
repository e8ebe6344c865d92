// The JSD kind of the row kernel: Jensen-Shannon divergence for 0 < beta < 1.
// Derivations: docs/kernel-math.md; each gradient is re-derived in a comment next to the code.
#pragma once

#include "../row_common.h"

namespace kdfast {
namespace CPU_CAPABILITY {

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
  // Two phases (kdfast/_spec.py): round 0 of STATS is sweep 1 (the lse statistics, KLStats' z, one
  // and v), round 1 is sweep 2 from the combined round 0 (the sums SP, SQ); FINISH combines both
  // rounds and runs the refine sweep and a gradient sweep that recomputes q, p and the softplus terms
  // (no scratch row lives from one phase to the next).
  const bool fused = P.phase == Phase::FUSED, finish = P.phase == Phase::FINISH;
  const bool round0 = P.phase == Phase::STATS && P.round == 0;
  // scratch (rows padded to whole blocks): sq holds exp(a - m_run) after sweep 1, then q; sh the
  // student's H; per teacher t, sp[t] exp(c - m_run), then p, and shp[t] log p - log m; then the maxima
  const int64_t Cp = (r.C + B - 1) / B * B, nb = Cp / B;
  A* const sq = scratch<A>(P.phase == Phase::FUSED ? (2 + 2 * M) * Cp + (1 + M) * nb * W : 0);
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
  KLStats<MT> st;
  st.zy = ri.zy;
  if (!(fused || round0)) {
    st.combine(RankStats{P.gstats, P.N, P.KG, ri.i, P.world}, M, ri.ce, ce_sep, false, false);
  } else {
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
      if (fused) {
        for (int k = 0; k < kBlock; ++k) e[k].store(sq + j0 + k * W);
        lz.m.store(mz + j0 / B * W);
      }
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) c[k] = vscale(v[k], iT);
        Lse<A> lv = Sv[t];
        lv.update(c, e);
        Sv[t] = lv;
        if (fused) {
          for (int k = 0; k < kBlock; ++k) e[k].store(sp[t] + j0 + k * W);
          lv.m.store(mv[t] + j0 / B * W);
        }
      }
    });
    st.z = total(Sz);
    if (ri.ce) st.one = ce_sep ? total(S1) : st.z;
    for (int t = 0; t < M; ++t) st.v[t] = total(Sv[t]);
    if (round0) {
      st.store(P.stats + ri.i * P.KS, M, ri.ce, ri.y >= 0);
      return RowOut{};
    }
  }  // (sweep 1)
  // log-softmaxes as (x - M) - l (M the row max, l = log S): no rounded lse is subtracted from a logit
  const LseTotal tz = st.z;
  const LseTotal t1 = ri.ce ? st.one : LseTotal{0.0, 1.0};
  const A nMz = A(-tz.M), nlz = A(-tz.l());
  A nMv[kCap<MT>] = {}, nlv[kCap<MT>] = {}, cz[kCap<MT>] = {};
  for (int t = 0; t < teachers<MT>(r); ++t) {
    const LseTotal tv = st.v[t];
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
  // sp(delta) - delta, which cancels for large delta). e^-|delta| = min(bp, bq) / max(bp, bq) with
  // bp = beta p, bq = (1 - beta) q (e^delta = bp / bq), p and q already at hand: no exp per element,
  // one division (vlog1p_ratio). Where both underflowed (max < 2^24 of the smallest normal: the
  // quotient would lose bits), the lanes take exp(-|delta|) from the logs instead (a branch per
  // vector, not taken in rows of ordinary scale).
  const A Ab = A(beta), A1b = A(1.0 - beta);
  const A tiny = std::numeric_limits<A>::min() * A(16777216);
  auto softplus_pair = [&](const Vec<A>& lp, const Vec<A>& lq, const Vec<A>& p, const Vec<A>& q,
                           Vec<A>& spd, Vec<A>& spn) {
    const Vec<A> delta = (lp - lq) + Vec<A>(lb);
    const Vec<A> bp = p * Vec<A>(Ab), bq = q * Vec<A>(A1b);
    Vec<A> mn = vec::minimum(bp, bq), mx = vec::maximum(bp, bq);
    const Vec<A> under = mx < Vec<A>(tiny);
    if (under.zero_mask() != (1 << Vec<A>::size()) - 1) {  // some lane underflowed
      mn = Vec<A>::blendv(mn, vexp(Vec<A>(A(0)) - delta.abs()), under);
      mx = Vec<A>::blendv(mx, Vec<A>(A(1)), under);
    }
    const Vec<A> L = vlog1p_ratio(mn, mx);
    spd = vec::clamp_min(delta, Vec<A>(A(0))) + L;
    spn = vec::clamp_min(Vec<A>(A(0)) - delta, Vec<A>(A(0))) + L;
  };
  // (the student's values are computed with teacher 0, in the same loop: with one teacher this is
  // one fused loop per vector; q, log q and H are kept for the other teachers)
  // FINISH reads SP, SQ (summed over the ranks); STATS round 1 writes this rank's parts
  const int64_t sp_col = klstat::COUNT + M * klteacherstat::COUNT;  // round 1's first column
  double SPs[kCap<MT>] = {}, SQs[kCap<MT>] = {};
  if (finish) {
    const RankStats g{P.gstats, P.N, P.KG, ri.i, P.world};
    for (int t = 0; t < M; ++t)
      SPs[t] = g.sum(int(sp_col) + 2 * t + jsdstat::SP), SQs[t] = g.sum(int(sp_col) + 2 * t + jsdstat::SQ);
  } else {
    sweep<A>(r, -1, false, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
      Vec<A> v[kBlock];  // the current teacher's block (locals: kept in registers)
      const Vec<A> fz = fused ? vexp((Vec<A>::loadu(mz + j0 / B * W) + Vec<A>(nMz)) + Vec<A>(nlz)) : Vec<A>(A(0));
      Vec<A> q[kBlock], lq[kBlock], H[kBlock], p[kBlock], hp[kBlock];
      for (int t = 0; t < teachers<MT>(r); ++t) {
        io.load(t, v);
        const Vec<A> fv = fused ? vexp((Vec<A>::loadu(mv[t] + j0 / B * W) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]))
                                : Vec<A>(A(0));
        Vec<A> kp = SP[t].part, kq = SQ[t].part;
        for (int k = 0; k < kBlock; ++k) {
          if (t == 0) {
            lq[k] = finite_floor((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz));
            q[k] = fused ? Vec<A>::loadu(sq + j0 + k * W) * fz : vexp(lq[k]);
          }
          const Vec<A> lp = finite_floor((vscale(v[k], iT) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
          p[k] = fused ? Vec<A>::loadu(sp[t] + j0 + k * W) * fv : vexp(lp);
          Vec<A> spd, spn;
          softplus_pair(lp, lq[k], p[k], q[k], spd, spn);
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
    for (int t = 0; t < M; ++t) SPs[t] = SP[t].total(), SQs[t] = SQ[t].total();
    if (P.phase == Phase::STATS) {  // round 1: this rank's parts of SP, SQ
      double* o = P.stats + ri.i * P.KS;
      for (int t = 0; t < M; ++t) o[2 * t + jsdstat::SP] = SPs[t], o[2 * t + jsdstat::SQ] = SQs[t];
      return RowOut{};
    }
  }  // (sweep 2)
  RowOut out;
  RowInfo rig = ri;  // (the label logit: combined over the ranks in FINISH)
  rig.zy = st.zy;
  if (ri.ce && finish && ce_cancels(rig, t1)) out.a[M] = 1.0, out.x[M] = ce_tail<A>(r, rig, t1);
  else out.CE = ri.ce ? ce_value<A>(r, rig, t1) : 0.0;
  double Kqs = 0;
  bool refine = false, rf[kCap<MT>] = {};
  const double Hb = -beta * std::log(beta) - (1.0 - beta) * std::log1p(-beta);  // the entropy of beta
  for (int t = 0; t < teachers<MT>(r); ++t) {
    out.D[t] = beta * (-std::log(beta) - SPs[t]) + (1.0 - beta) * (-std::log1p(-beta) - SQs[t]);  // = Hb - ...
    rf[t] = needs_refine(out.D[t], Hb);
    refine |= rf[t];
    Kqs += double(cz[t]) * SQs[t];
  }
  if (refine) {
    // A small JSD cancels against Hb: the loss from nonnegative terms instead (docs/kernel-math.md,
    // rule 3), in a sweep of its own for such rows. With sum_j q_j e^{-hq_j} = sum_j m_j = 1,
    // KL(q || m) = sum_j q_j phi(-hq_j) (phi_term: the series for |hq| <= 1, else m_j - q_j + q_j hq_j),
    // likewise KL(p || m), hq = -log(1 - beta) - sp(delta), hp = -log beta - sp(-delta).
    const A nlb = A(-std::log(beta)), nl1b = A(-std::log1p(-beta));
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
          softplus_pair(lp, lq[k], p, q[k], spd, spn);
          const Vec<A> m = vec::fmadd(p, Vec<A>(Ab), q[k] * Vec<A>(A1b));
          DD[t].add(vec::fmadd(phi_term(p, Vec<A>(nlb) - spn, m, one), Vec<A>(Ab),
                               phi_term(q[k], Vec<A>(nl1b) - spd, m, one) * Vec<A>(A1b)));
        }
        DD[t].end_block();
      }
    });
    for (int t = 0; t < teachers<MT>(r); ++t) {
      if (!rf[t]) continue;
      if (finish) out.D[t] = 0.0, out.x[t] = DD[t].total();  // (a = 0: a sum over the ranks)
      else out.D[t] = DD[t].total();
    }
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
  if (finish) {  // the same gradient, q, p and the softplus terms recomputed from z and v (sweep 2's)
    sweep<A>(r, -1, true, [&](auto, Block<A>& b, int64_t j0, const auto& io) {
      Vec<A> v[kBlock], gv[kBlock], lq[kBlock], q[kBlock], H[kBlock];
      for (int k = 0; k < kBlock; ++k) {
        lq[k] = finite_floor((vscale(b.z[k], iT) + Vec<A>(nMz)) + Vec<A>(nlz));
        q[k] = vexp(lq[k]);
        H[k] = Vec<A>(nKq);
        b.gz[k] = ri.ce ? (ce_sep ? vexp((b.z[k] + Vec<A>(nM1)) + Vec<A>(nl1)) : q[k]) * Vec<A>(gce) : Vec<A>(A(0));
      }
      if (ri.ce) add_at(b.gz, j0, ri.y, A(-gce));  // (ri.y is -1 where another rank holds the label)
      for (int t = 0; t < M; ++t) {
        io.load(t, v);
        for (int k = 0; k < kBlock; ++k) {
          const Vec<A> lp = finite_floor((vscale(v[k], iT) + Vec<A>(nMv[t])) + Vec<A>(nlv[t]));
          const Vec<A> p = vexp(lp);
          Vec<A> spd, spn;
          softplus_pair(lp, lq[k], p, q[k], spd, spn);
          H[k] = vec::fnmadd(spd, Vec<A>(cz[t]), H[k]);
          gv[k] = p * (Vec<A>(nKp[t]) - spn) * Vec<A>(cv[t]);
        }
        io.store(t, gv);
      }
      for (int k = 0; k < kBlock; ++k) b.gz[k] = vec::fmadd(q[k], H[k], b.gz[k]);
    });
    return out;
  }
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

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
