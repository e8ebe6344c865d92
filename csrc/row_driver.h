// The CPU row kernel's driver: the row loop (labels, weights, ignored / invalid rows), the dispatch on
// the loss kind to row_<kind> (csrc/kinds/*.h, over the shared primitives of csrc/row_common.h) and the
// ISA's entry point run_rows_impl (dtype and single / multi-teacher dispatch). Included once per ISA by
// kernel_<isa>.cpp, which wraps run_rows_impl / log_f32_impl as kdfast::<ISA>::run_rows / log_f32.
#pragma once

#include "row_common.h"
#include "kinds/dkd.h"
#include "kinds/jsd.h"
#include "kinds/kl.h"
#include "kinds/logit_matching.h"
#include "kinds/ls.h"
#include "kinds/topk.h"

namespace kdfast {
namespace CPU_CAPABILITY {

// ===================================================================================================
// Row loop: labels, weights, ignored / invalid rows, kind dispatch.
// ===================================================================================================

template <int MT, class TZ, class TV>
void rows(const KernelArgs& P, int64_t begin, int64_t end) {
  using A = std::conditional_t<std::is_same_v<TZ, double>, double, float>;
  const int M = MT ? MT : P.M;
  const TZ* z = static_cast<const TZ*>(P.z);
  const TZ* zp = static_cast<const TZ*>(P.zp);
  TZ* gz = static_cast<TZ*>(P.grad_z);
  const A* kd_w = static_cast<const A*>(P.kd_w);  // (M, N)
  const A* ce_w = static_cast<const A*>(P.ce_w);
  A* d_out = static_cast<A*>(P.d_out);            // (M, N)
  A* ce_out = static_cast<A*>(P.ce_out);
  const int64_t C = P.C, N = P.N;
  // two phases: labels are global ids, the local columns [col0, col0 + C) of `vocab`
  const Phase phase = P.phase;
  const int64_t col0 = phase == Phase::FUSED ? 0 : P.col0, vocab = phase == Phase::FUSED ? C : P.vocab;
  auto finish_row = [&](int64_t i) {  // FINISH's extra outputs of an ignored / invalid row (b says it)
    if (phase != Phase::FINISH) return;
    for (int t = 0; t <= M; ++t) P.coef[t * N + i] = 0.0, P.part[t * N + i] = 0.0;
  };
  for (int64_t i = begin; i < end; ++i) {
    Row<TZ, TV> r{z + i * P.sz, zp ? zp + i * P.szp : nullptr, gz ? gz + i * P.sgz : nullptr, C,
                  zp ? 1.0 - P.rho : 1.0, zp ? P.rho : 0.0, M, {}, {}};
    RowInfo ri{-1, false, 0.0, 0.0, {}, {}, i};
    for (int t = 0; t < M; ++t) {
      r.v[t] = P.v[t] ? static_cast<const TV*>(P.v[t]) + i * P.sv[t] : nullptr;
      r.gv[t] = P.grad_v[t] ? static_cast<TV*>(P.grad_v[t]) + i * P.sgv[t] : nullptr;
      ri.g_kd[t] = kd_w ? P.grad_scale * double(kd_w[t * N + i]) : 0.0;
    }
    if (P.labels) {
      const int64_t y = P.labels[i];
      if (y == P.ignore_index || y < 0 || y >= vocab) {  // ignored: zeros; out of range: NaN (never indexed)
        const double x = y == P.ignore_index ? 0.0 : NAN;
        if (phase == Phase::STATS) {  // (never read)
          for (int64_t k = 0; k < P.KS; ++k) P.stats[i * P.KS + k] = 0.0;
          continue;
        }
        ce_out[i] = A(x);
        fill_row(r.gz, C, x);
        for (int t = 0; t < M; ++t) {
          d_out[t * N + i] = A(x);
          fill_row(r.gv[t], C, x);
        }
        finish_row(i);
        continue;
      }
      ri.ce = P.has_ce;
      ri.g_ce = ri.ce && ce_w ? P.grad_scale * double(ce_w[i]) : 0.0;
      const int64_t yl = y - col0;
      if (yl >= 0 && yl < C) {  // this shard holds the label's column (always, unless two phases)
        ri.y = yl;
        ri.zy = double(r.z[yl]);
        for (int t = 0; t < M; ++t)
          ri.vy[t] = r.v[t] ? mixed<A>(r, t, yl) : 0.0;
      }
    }
    RowOut o;
    switch (P.kind) {
      case Kind::KL: o = P.reverse ? row_kl<true, MT, A>(P, r, ri) : row_kl<false, MT, A>(P, r, ri); break;
      case Kind::DKD: o = row_dkd<MT, A>(P, r, ri); break;
      case Kind::LM: o = row_lm<MT, A>(P, r, ri); break;
      case Kind::LS: o = row_ls<MT, A>(P, r, ri); break;
      case Kind::JSD: o = row_jsd<MT, A>(P, r, ri); break;
      case Kind::TOPK:
        if constexpr (MT == 1) o = row_topk<A>(P, r, ri, i);  // single teacher only (checked by the binding)
        break;
    }
    if (phase == Phase::STATS) continue;  // (the row function wrote its statistics)
    for (int t = 0; t < M; ++t) d_out[t * N + i] = A(o.D[t]);
    ce_out[i] = A(o.CE);
    if (phase == Phase::FINISH)
      for (int t = 0; t <= M; ++t) P.coef[t * N + i] = o.a[t], P.part[t * N + i] = o.x[t];
  }
}

// vlog over an array (the test hook behind kdfast._C.vec_log: the ulp test of tests/test_cpu_isa.py)
inline void log_f32_impl(const float* x, float* y, int64_t n) {
  constexpr int W = Vec<float>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) vlog(Vec<float>::loadu(x + j)).store(y + j);
  if (j < n) vlog(Vec<float>::loadu(x + j, n - j)).store(y + j, n - j);
}

// The ISA's entry point: dispatch on the dtypes (z and v independently among float / bf16 / fp16 with
// float accumulation, or both double) and on single / multi-teacher.
inline void run_rows_impl(const KernelArgs& P, int64_t begin, int64_t end) {
  // one teacher: the MT = 1 instantiation (every per-teacher array a scalar); more: MT = 0 (dynamic)
  auto with_m = [&](auto tz_tag, auto tv_tag) {
    using TZ = decltype(tz_tag);
    using TV = decltype(tv_tag);
    if (P.M == 1) rows<1, TZ, TV>(P, begin, end);
    else rows<0, TZ, TV>(P, begin, end);
  };
  auto with_v = [&](auto tz_tag) {
    switch (P.tv) {
      case DType::F32: return with_m(tz_tag, float{});
      case DType::BF16: return with_m(tz_tag, BFloat16{});
      case DType::F16: return with_m(tz_tag, Half{});
      default: return;
    }
  };
  switch (P.tz) {
    case DType::F32: return with_v(float{});
    case DType::BF16: return with_v(BFloat16{});
    case DType::F16: return with_v(Half{});
    case DType::F64: return with_m(double{}, double{});
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
