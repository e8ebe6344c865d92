// Shared primitives of the C++ row kernel (every loss kind uses them): ATen vector helpers and the
// vector exp / log / log1p, InvT, block load / store, Row / Block / BlockIO and `sweep` (one pass over a
// row in blocks), the online log-sum-exp (Lse, LseTotal, LongSum), shifted sums, phi / wphi /
// needs_refine, RowInfo / RowOut and the small scalar helpers. Included (through the kind headers in
// csrc/kinds/ and csrc/row_driver.h) once per ISA by kernel_<isa>.cpp, after that file has defined
// CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and switched the compiler target, so that everything here lives
// in the namespace kdfast::<ISA> and ATen's Vectorized<T> is the <ISA> implementation.
//
// Compiled once per ISA: kernel_<isa>.cpp defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and setup.py
// gives that file the matching -m flags, like ATen's own kernels.
//
// Structure (docs/kernel-math.md has the math):
//   * `sweep` walks one row in blocks of kBlock vectors, upcasts z / v (and the retro mix with zp) to
//     the accumulation type on load, hands the block to a per-pass lambda and stores the gradient the
//     lambda produced, downcast once. The tail of the row (and, for DKD, the block holding the label
//     column) goes through the same lambda on a padded copy with the dead lanes set to -inf: no
//     per-element branch anywhere.
//   * `Lse` is the online max / sum-of-exp of one stream, per lane, updated once per block: the rescale
//     exp(m_old - m_new) costs one exp per block of kBlock vectors, not one per element.
//   * one `row_<kind>` per loss kind (csrc/kinds/<kind>.h): its passes (statistics, then gradient) as
//     lambdas over `sweep`.
//   * `rows<TZ, TV>` (csrc/row_driver.h) handles labels (ignored / out of range rows), weights, and
//     dispatches on the kind.
// A named loss (kd, ttm, wttm, retro_kd, ...) is only a choice of parameters of these kinds.
#pragma once

#include "kernel_api.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace kdfast {
namespace CPU_CAPABILITY {  // DEFAULT / AVX2 / AVX512: one copy per compiled ISA

namespace vec = at::vec;
using c10::BFloat16;
using c10::Half;

template <class A>
using Vec = vec::Vectorized<A>;

// Forced inlining of the per-block helpers: with the single- and the multi-teacher instantiations of
// every kind GCC stopped inlining Lse::update into the row loops (an out-of-line call through the PLT
// per block: kd forward 13-16 % slower, measured), so the hot helpers do not leave it to heuristics.
#if defined(__GNUC__)
#define KD_INLINE inline __attribute__((always_inline))
#else
#define KD_INLINE inline
#endif

// Vectors per block: the online rescale costs one exp per stream per block.
constexpr int kBlock = 4;

template <class A>
inline A lowest() { return std::numeric_limits<A>::lowest(); }
template <class A>
inline A ninf() { return -std::numeric_limits<A>::infinity(); }

// exp: ATen's exp_u20 for float (a degree-5 polynomial after range reduction, <= 20 ulp, inputs below
// ln(FLT_MIN) flush to 0, -inf -> 0); the accurate Sleef exp for double (gradcheck path).
inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }
// log for float lanes: ATen's Vectorized<float>::log calls Sleef's out-of-line logf (a call per vector
// through a dispatch pointer) which made JSD's per-element log m cost more than its four exps. Inline
// here: x = 2^e * m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716,
// 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9) + O(s^11/11) (truncation < 1e-9 relative), and
// log x = e ln2 + log m with ln2 split in two so that e ln2 is exact. Measured <= 2 ulp over the normal
// and subnormal range (tests/test_cpu_isa.py); 0 -> -inf, +inf -> +inf, negative / NaN -> NaN.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX2)
using fvec = __m256;
using ivec = __m256i;
using fmask = __m256;
#define KD_F(op) _mm256_##op##_ps
#define KD_I(op) _mm256_##op##_si256
#define KD_I32(op) _mm256_##op##_epi32
#define KD_TOI(x) _mm256_castps_si256(x)
#define KD_TOF(x) _mm256_castsi256_ps(x)
#define KD_CMP(a, b, pred) _mm256_cmp_ps(a, b, pred)
#define KD_BLEND(a, b, m) _mm256_blendv_ps(a, b, m)   // m ? b : a
#else
using fvec = __m512;
using ivec = __m512i;
using fmask = __mmask16;
#define KD_F(op) _mm512_##op##_ps
#define KD_I(op) _mm512_##op##_si512
#define KD_I32(op) _mm512_##op##_epi32
#define KD_TOI(x) _mm512_castps_si512(x)
#define KD_TOF(x) _mm512_castsi512_ps(x)
#define KD_CMP(a, b, pred) _mm512_cmp_ps_mask(a, b, pred)
#define KD_BLEND(a, b, m) _mm512_mask_blend_ps(m, a, b)   // m ? b : a
#endif
inline Vec<float> vlog(const Vec<float>& xv) {
  const fvec x = xv;
  // subnormals: scale by 2^23 first (the exponent field is then that of a normal number)
  const fmask sub = KD_CMP(x, KD_F(set1)(1.17549435e-38f), _CMP_LT_OQ);
  const fvec xs = KD_BLEND(x, KD_F(mul)(x, KD_F(set1)(8388608.0f)), sub);
  const fvec ebias = KD_BLEND(KD_F(set1)(127.0f), KD_F(set1)(150.0f), sub);
  const ivec bits = KD_TOI(xs);
  const fvec m0 = KD_TOF(KD_I(or)(KD_I(and)(bits, KD_I32(set1)(0x007fffff)), KD_I32(set1)(0x3f800000)));
  fvec e = KD_F(sub)(KD_F(cvtepi32)(KD_I32(srli)(bits, 23)), ebias);
  const fmask big = KD_CMP(m0, KD_F(set1)(1.41421356f), _CMP_GT_OQ);  // m in [1, 2): halve the top part
  const fvec m = KD_BLEND(m0, KD_F(mul)(m0, KD_F(set1)(0.5f)), big);
  e = KD_BLEND(e, KD_F(add)(e, KD_F(set1)(1.0f)), big);
  const fvec one = KD_F(set1)(1.0f);
  const fvec s = KD_F(div)(KD_F(sub)(m, one), KD_F(add)(m, one));
  const fvec s2 = KD_F(mul)(s, s);
  fvec P = KD_F(fmadd)(s2, KD_F(set1)(1.0f / 9.0f), KD_F(set1)(1.0f / 7.0f));
  P = KD_F(fmadd)(s2, P, KD_F(set1)(1.0f / 5.0f));
  P = KD_F(fmadd)(s2, P, KD_F(set1)(1.0f / 3.0f));
  const fvec s2x = KD_F(add)(s, s);
  const fvec logm = KD_F(fmadd)(KD_F(mul)(s2x, s2), P, s2x);
  // e * ln2 = e * 0.693145751953125 (15 significant bits: exact for |e| < 2^9) + e * 1.42860677e-6
  fvec r = KD_F(fmadd)(e, KD_F(set1)(1.42860677e-06f), logm);
  r = KD_F(fmadd)(e, KD_F(set1)(0.693145751953125f), r);
  // specials: x == 0 -> -inf, x == inf -> inf, x < 0 or NaN -> NaN
  r = KD_BLEND(r, KD_F(set1)(-INFINITY), KD_CMP(x, KD_F(setzero)(), _CMP_EQ_OQ));
  r = KD_BLEND(r, x, KD_CMP(x, KD_F(set1)(INFINITY), _CMP_EQ_OQ));
  r = KD_BLEND(r, KD_F(set1)(NAN), KD_CMP(x, KD_F(setzero)(), _CMP_NGE_UQ));
  return Vec<float>(r);
}
#undef KD_F
#undef KD_I
#undef KD_I32
#undef KD_TOI
#undef KD_TOF
#undef KD_CMP
#undef KD_BLEND
#else
inline Vec<float> vlog(const Vec<float>& x) { return x.log(); }  // portable: std::log per lane
#endif
inline Vec<double> vlog(const Vec<double>& x) { return x.log(); }
// log1p for x >= 0 (JSD's softplus terms, x = exp(-|delta|) <= 1): log(u) * x / (u - 1) with u = 1 + x
// (the rounding of 1 + x cancels in the ratio); x itself where u rounds to 1.
template <class A>
inline Vec<A> vlog1p(const Vec<A>& x) {
  const Vec<A> u = x + Vec<A>(A(1));
  const Vec<A> d = u - Vec<A>(A(1));
  return Vec<A>::blendv(vlog(u) * (x / d), x, d == Vec<A>(A(0)));
}
// log1p(t) for t = a / b in [0, 1] (JSD's softplus terms, t = exp(-|delta|) = min / max of beta p and
// (1 - beta) q), in float: no exponent split is needed there, so directly log1p(t) = 2 atanh(s),
//   s = t / (2 + t) = a / (2b + a) in [0, 1/3],
//   2 atanh(s) = 2s + 2s w (1/3 + w/5 + w^2/7 + ... + w^5/13) + R,  w = s^2 <= 1/9,
// R / log1p(t) < w^7 / 15 <= 1.4e-8 (below float's half ulp). 2b + a and the quotient round once
// each: s is within ~1.5 ulp, and so is the result, also for tiny t (log1p(t) ~ t, no cancellation).
// One division and 8 FMA-class operations, against an exp, vlog1p's two divisions and a full vlog.
// Double (the gradcheck path) takes vlog1p of the quotient.
inline Vec<float> vlog1p_ratio(const Vec<float>& a, const Vec<float>& b) {
  const Vec<float> s = a / (b + b + a);
  const Vec<float> s2 = s + s, w = s * s;
  Vec<float> Q = vec::fmadd(w, Vec<float>(1.0f / 13.0f), Vec<float>(1.0f / 11.0f));
  Q = vec::fmadd(w, Q, Vec<float>(1.0f / 9.0f));
  Q = vec::fmadd(w, Q, Vec<float>(1.0f / 7.0f));
  Q = vec::fmadd(w, Q, Vec<float>(1.0f / 5.0f));
  Q = vec::fmadd(w, Q, Vec<float>(1.0f / 3.0f));
  return vec::fmadd(s2 * w, Q, s2);
}
inline Vec<double> vlog1p_ratio(const Vec<double>& a, const Vec<double>& b) { return vlog1p(a / b); }

// (Sleef's 1-ulp exp in the gradient sweeps was measured at 190 -> 275 ms for kd 4096 x 32000 fp32
// fwd+bwd on the AVX2 dev machine, for fp32 gradients ~1.5x closer to float64: not worth it; the
// tests bound the fp32 error with the 20-ulp term.)

// 1/T as hi + lo (hi = fl(1/T)): x * hi + x * lo rounds like x / T (one rounding of a nearly exact
// value), where x * fl(1/T) alone scales every logit by the same relative error of fl(1/T): a
// systematic temperature error of up to eps, which moves p_j / p_k by eps * |c_j - c_k| (6e-6 at
// logits of 100). lo = 0 for T a power of two (T = 1: x exactly).
template <class A>
struct InvT {
  A hi, lo;
  explicit InvT(double T) : hi(A(1.0 / T)), lo(A(1.0 / T - double(A(1.0 / T)))) {}
};
// (-inf stays -inf: the lo term takes max(x, lowest), so -inf * lo never makes a NaN; lo = 0 is one multiply)
template <class A>
inline Vec<A> finite_floor(const Vec<A>& x);
// a * b + c rounded once on every ISA, as the scalar recomputations (scaled, mixed) take it with
// std::fma: ATen's vec::fmadd is the FMA instruction on AVX2 / AVX-512 but a * b + c, rounded twice,
// in the DEFAULT build, where a label column recomputed in scalar code then rounded differently from
// its lane (found by the randomised top-k group under ATEN_CPU_CAPABILITY=default).
template <class A>
KD_INLINE Vec<A> vfma(const Vec<A>& a, const Vec<A>& b, const Vec<A>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return vec::fmadd(a, b, c);
#else
  constexpr int W = Vec<A>::size();
  A x[W], y[W], w[W];
  a.store(x), b.store(y), c.store(w);
  for (int i = 0; i < W; ++i) x[i] = std::fma(x[i], y[i], w[i]);
  return Vec<A>::loadu(x);
#endif
}
template <class A>
KD_INLINE Vec<A> vscale(const Vec<A>& x, const InvT<A>& it) {
  if (it.lo == A(0)) return x * Vec<A>(it.hi);
  return vfma(x, Vec<A>(it.hi), finite_floor(x) * Vec<A>(it.lo));
}

// max(x, lowest): maps -inf to the most negative finite number so that 0 * (x - y) stays 0 where the
// probability is 0 (guards 0 * inf without a blend); NaN propagates.
template <class A>
inline Vec<A> finite_floor(const Vec<A>& x) { return vec::clamp_min(x, Vec<A>(lowest<A>())); }

// ---------------------------------------------------------------------------------------------------
// loads / stores of one block (kBlock vectors), upcast to A on load, downcast on store
template <class A, class T>
KD_INLINE void load_block(const T* p, Vec<A>* out) {
  constexpr int W = Vec<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    for (int k = 0; k < kBlock; ++k) out[k] = Vec<A>::loadu(p + k * W);
  } else {
    for (int k = 0; k < kBlock; ++k) vec::load_to_float<T>(p + k * W, out[k]);
  }
}
template <class A, class T>
KD_INLINE void store_block(T* p, const Vec<A>* in) {
  constexpr int W = Vec<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    for (int k = 0; k < kBlock; ++k) in[k].store(p + k * W);
  } else {
    static_assert(kBlock % 2 == 0, "16-bit stores convert pairs of float vectors");
    for (int k = 0; k < kBlock; k += 2) vec::convert_from_float<T>(in[k], in[k + 1]).store(p + k * W);
  }
}
template <class A, class T>
inline void load_partial(const T* p, int64_t n, Vec<A>* out) {
  constexpr int W = Vec<A>::size();
  alignas(64) A buf[kBlock * W];
  for (int64_t j = 0; j < kBlock * W; ++j) buf[j] = j < n ? static_cast<A>(p[j]) : A(0);
  for (int k = 0; k < kBlock; ++k) out[k] = Vec<A>::loadu(buf + k * W);
}
template <class A, class T>
inline void store_partial(T* p, int64_t n, const Vec<A>* in) {
  constexpr int W = Vec<A>::size();
  alignas(64) A buf[kBlock * W];
  for (int k = 0; k < kBlock; ++k) in[k].store(buf + k * W);
  for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(buf[j]);
}

// ---------------------------------------------------------------------------------------------------
// one row of every tensor
template <class TZ, class TV>
struct Row {
  const TZ* z;
  const TZ* zp;  // retro_kd past logits or null
  TZ* gz;        // or null
  int64_t C;
  double w_v, w_zp;  // teacher row = w_v * v + w_zp * zp (retro_kd); w_v = 1 without zp
  int M;                       // teachers (1 unless multi-teacher)
  const TV* v[kMaxTeachers];   // teacher rows (v[0] null for TOPK)
  TV* gv[kMaxTeachers];        // their gradient rows, all null or none
};

// Lanes of a block for the lambdas: `live` (only in special blocks) is the mask of real columns.
template <class A>
struct Block {
  Vec<A> z[kBlock];              // upcast student values
  Vec<A> gz[kBlock];             // the student gradient the lambda writes (stored by sweep)
  Vec<A> live[kBlock];           // all-ones bits on real columns (special blocks only)
  Vec<A> zpw[kBlock];            // retro_kd: w_zp * zp of the block (loaded once for every teacher)
};

// The teachers of one block: the lambda loads teacher t's block into its own array with
// `load(t, v)` (upcast, retro mix, -inf on dead lanes in special blocks) and writes a gradient block
// to teacher t's gradient row with `store(t, g)` (a no-op without teacher gradients). The arrays are
// the lambda's locals, not Block members: a store into memory the compiler cannot tell apart from
// the lambda's accumulators made it reload them (measured: pass 1 of kd 16 % slower). The student
// block is loaded once, whatever the number of teachers: multi-teacher rows read z once per sweep.
template <class A, class TZ, class TV, bool Special>
struct BlockIO {
  const Row<TZ, TV>& r;
  const Block<A>& b;
  int64_t j0, n;  // first column; live columns (the whole block unless Special)
  Vec<A> wv;
  KD_INLINE void load(int t, Vec<A>* v) const {
    if constexpr (Special) load_partial<A>(r.v[t] + j0, n, v);
    else load_block<A>(r.v[t] + j0, v);
    if (r.zp) for (int k = 0; k < kBlock; ++k) v[k] = vfma(v[k], wv, b.zpw[k]);  // as mixed()
    if constexpr (Special)
      for (int k = 0; k < kBlock; ++k) v[k] = Vec<A>::blendv(Vec<A>(ninf<A>()), v[k], b.live[k]);
  }
  KD_INLINE void store(int t, const Vec<A>* g) const {
    if (!r.gv[t]) return;
    if constexpr (Special) store_partial<A>(r.gv[t] + j0, n, g);
    else store_block<A>(r.gv[t] + j0, g);
  }
};

// Walk a row. f(std::bool_constant<Special>, Block&, j0, io) is called once per block (j0 its first
// column) with the student block in b.z and `io` (BlockIO) to load / store the teachers' blocks; Special
// blocks are the tail and the block holding `skip_col` (DKD's label column, or -1), on a padded copy
// whose dead lanes (beyond C, and skip_col) hold -inf in z and in every teacher block. When `store`,
// b.gz is written to the row's gradient after the lambda ran, so gz may alias z (read before write).
template <class A, class TZ, class TV, class F>
inline void sweep(const Row<TZ, TV>& r, int64_t skip_col, bool store, F&& f) {
  constexpr int W = Vec<A>::size();
  constexpr int64_t B = int64_t(kBlock) * W;
  const Vec<A> wv(static_cast<A>(r.w_v)), wzp(static_cast<A>(r.w_zp));
  Block<A> b;
  int64_t j = 0;
  for (; j + B <= r.C; j += B) {
    if (skip_col >= j && skip_col < j + B) continue;  // one predictable compare per block
    if (r.z) load_block<A>(r.z + j, b.z);  // (a sweep that only writes passes null)
    if (r.zp) {  // uniform per call: retro_kd mixes the past student into every teacher row
      load_block<A>(r.zp + j, b.zpw);
      for (int k = 0; k < kBlock; ++k) b.zpw[k] = b.zpw[k] * wzp;
    }
    f(std::false_type{}, b, j, BlockIO<A, TZ, TV, false>{r, b, j, B, wv});
    if (store && r.gz) store_block<A>(r.gz + j, b.gz);
  }
  auto special_block = [&](int64_t j0) {
    const int64_t n = std::min<int64_t>(B, r.C - j0);
    if (r.z) load_partial<A>(r.z + j0, n, b.z);
    if (r.zp) {
      load_partial<A>(r.zp + j0, n, b.zpw);
      for (int k = 0; k < kBlock; ++k) b.zpw[k] = b.zpw[k] * wzp;
    }
    const Vec<A> idx = Vec<A>::arange(A(0), A(1));
    const Vec<A> nvec(static_cast<A>(n));
    const Vec<A> skip(static_cast<A>(skip_col >= j0 && skip_col < j0 + n ? skip_col - j0 : -1));
    const Vec<A> neg_inf(ninf<A>());
    for (int k = 0; k < kBlock; ++k) {
      const Vec<A> col = idx + Vec<A>(static_cast<A>(k * W));
      b.live[k] = (col < nvec) & (col != skip);
      b.z[k] = Vec<A>::blendv(neg_inf, b.z[k], b.live[k]);
    }
    f(std::true_type{}, b, j0, BlockIO<A, TZ, TV, true>{r, b, j0, n, wv});
    if (store && r.gz) store_partial<A>(r.gz + j0, n, b.gz);
  };
  if (skip_col >= 0 && skip_col < j) special_block(skip_col - skip_col % B);
  if (j < r.C) special_block(j);
}

// The number of teachers a row function handles: MT at compile time (1: the single-teacher kernel,
// every per-teacher array a scalar), or r.M (MT == 0, multi-teacher, up to kMaxTeachers). The loops
// over teachers inside the sweep lambdas call this rather than capture a local count, so that with
// MT = 1 the trip count is a constant even where GCC does not inline the lambda.
template <int MT, class TZ, class TV>
inline int teachers(const Row<TZ, TV>& r) { return MT ? MT : r.M; }
template <int MT>
constexpr int kCap = MT ? MT : kMaxTeachers;  // per-teacher array sizes

// ---------------------------------------------------------------------------------------------------
// Online log-sum-exp of one stream, per lane: m the running max, s the sum of exp(x - m).
template <class A>
struct Lse {
  Vec<A> m{lowest<A>()}, s{A(0)};
  // Add a block; e[k] = exp(x[k] - m_new); returns the rescale factor exp(m_old - m_new) so that other
  // accumulators weighted by this stream's exponentials can be rescaled with it.
  KD_INLINE Vec<A> update(const Vec<A>* x, Vec<A>* e) {
    Vec<A> bm = x[0];
    for (int k = 1; k < kBlock; ++k) bm = vec::maximum(bm, x[k]);  // NaN-propagating
    const Vec<A> mn = vec::maximum(m, bm);
    // The rescale exp(m - mn) is 1 unless a lane's max moved, which after the first blocks of a row
    // is rare: one compare + movemask saves an exp per block (a NaN max counts as moved).
    constexpr int kAll = (1 << Vec<A>::size()) - 1;
    const bool same = (mn != m).zero_mask() == kAll;
    const Vec<A> r = same ? Vec<A>(A(1)) : vexp(m - mn);
    m = mn;
    Vec<A> acc = same ? s : s * r;
    for (int k = 0; k < kBlock; ++k) {
      e[k] = vexp(x[k] - mn);
      acc = acc + e[k];
    }
    s = acc;
    return r;
  }
};

// exp(m_l - M) for every lane l of m, in double: the ISA's double vectors (Sleef's 1-ulp exp; scalar
// std::exp in the DEFAULT build), two or four vector calls where the per-lane std::exp calls of every
// row's horizontal finishes cost ~0.5 us a row (a sixth of a 1000-class row's time).
template <class A>
KD_INLINE void lane_exps(const Vec<A>& m, double M, double* out) {
  constexpr int W = Vec<A>::size(), WD = Vec<double>::size();
  alignas(64) A mm[W];
  alignas(64) double t[W];
  m.store(mm);
  for (int l = 0; l < W; ++l) t[l] = double(mm[l]) - M;
  for (int l = 0; l < W; l += WD) Vec<double>::loadu(t + l).exp().store(out + l);
}

// Horizontal finish of a stream: M = max over lanes, S = sum_l s_l exp(m_l - M); lse = M + log S.
struct LseTotal {
  double M, S;
  double lse() const { return M + std::log(S); }
  double l() const { return std::log(S); }  // log S: the log-softmax is (x - M) - l (never x - lse)
};
template <class A>
inline LseTotal total(const Lse<A>& o) {
  constexpr int W = Vec<A>::size();
  alignas(64) A m[W], s[W];
  o.m.store(m);
  o.s.store(s);
  double M = m[0];
  for (int l = 1; l < W; ++l) M = (std::isnan(M) || std::isnan(double(m[l]))) ? NAN : std::max(M, double(m[l]));
  alignas(64) double x[W];
  lane_exps(o.m, M, x);
  double S = 0;
  for (int l = 0; l < W; ++l) S += double(s[l]) * x[l];
  return {M, S};
}
// ---------------------------------------------------------------------------------------------------
// The statistics pass's exponentials, kept for the gradient pass (the kernel is bound by its
// exponentials, not by memory, and the gradient pass recomputed every one of them).
// A stream's pass-1 values are e_j = exp(x_j - m_b), m_b the lane maxima of the online max just after
// x_j's block b (Lse::update). The gradient pass needs exp((x_j - M) - l) = e_j * f_b with the
// per-lane factor f_b = exp((m_b - M) - l): one vector exp per block where a lane max moved (rare
// after a row's first blocks; ExpRead compares, as Lse::update does), instead of one per element.
// Rounding: e_j * f_b rounds the product once more than the direct exp; each factor's argument is a
// difference of logits (and l), as in the direct form, so no rounded lse is subtracted from a logit.
// Per thread, for rows of up to kCacheCols columns: a row's cache, inputs and gradient stay in L2.
// Per-thread scratch of at least n values of A, reused across rows and calls (the values a row's
// statistics sweep keeps for its gradient sweep: ExpCache below, and JSD's own layout, which also
// keeps log-ratios; one row's worth stays in L2 up to C ~ 32K).
template <class A>
inline A* scratch(int64_t n) {
  thread_local std::vector<A> buf;
  if (int64_t(buf.size()) < n) buf.resize(size_t(n));
  return buf.data();
}
constexpr int64_t kCacheCols = 65536;
template <class A>
struct ExpCache {
  static constexpr int W = Vec<A>::size();
  static constexpr int64_t B = int64_t(kBlock) * W;
  A* e[3] = {};  // per stream: the values, C rounded up to whole blocks
  A* m[3] = {};  // per stream: each block's lane maxima
  ExpCache() = default;  // off
  // `streams` streams for a row of C columns, in this thread's scratch
  ExpCache(int64_t C, int streams) {
    const int64_t cp = (C + B - 1) / B * B, nb = cp / B * W;
    A* const buf = scratch<A>(streams * (cp + nb));
    for (int s = 0; s < streams; ++s) e[s] = buf + s * (cp + nb), m[s] = e[s] + cp;
  }
  KD_INLINE void put(int s, int64_t j, const Vec<A>* x, const Vec<A>& mb) const {
    for (int k = 0; k < kBlock; ++k) x[k].store(e[s] + j + k * W);
    mb.store(m[s] + j / B * W);
  }
  KD_INLINE Vec<A> get(int s, int64_t j, int k) const { return Vec<A>::loadu(e[s] + j + k * W); }
  KD_INLINE Vec<A> max(int s, int64_t j) const { return Vec<A>::loadu(m[s] + j / B * W); }
};
// The factor f_b = exp((m_b - M) - l) of one stream, recomputed only where a lane max moved.
template <class A>
struct ExpRead {
  Vec<A> nM, nl, mb{A(0)}, f{A(0)};
  bool fresh = true;
  ExpRead(double M, double l) : nM(A(-M)), nl(A(-l)) {}
  KD_INLINE Vec<A> factor(const Vec<A>& m) {
    constexpr int kAll = (1 << Vec<A>::size()) - 1;
    if (fresh || (m != mb).zero_mask() != kAll) {   // (a NaN max counts as moved)
      f = vexp((m + nM) + nl);
      mb = m, fresh = false;
    }
    return f;
  }
};
// x^P for P in {2, 4} (the CE stream at T = 2 or 4 from the student's: exp(z - T m) = exp(z/T - m)^T,
// z/T exact for a power of two)
template <class A>
KD_INLINE Vec<A> vpow(const Vec<A>& x, int P) {
  const Vec<A> x2 = x * x;
  return P == 4 ? x2 * x2 : x2;
}

// sum over lanes of an accumulator kept at the scale of stream o (acc_l relative to exp(m_l)),
// expressed at the scale of t.M
template <class A>
inline double rescaled_sum(const Vec<A>& acc, const Lse<A>& o, const LseTotal& t) {
  constexpr int W = Vec<A>::size();
  alignas(64) A a[W];
  alignas(64) double x[W];
  acc.store(a);
  lane_exps(o.m, t.M, x);
  double S = 0;
  for (int l = 0; l < W; ++l) S += double(a[l]) * x[l];
  return S;
}
// A plain per-lane sum over a long row: the fp32 lanes are flushed into double lanes every kFlush
// blocks, so the rounding error grows with kFlush * kBlock terms, not with C (a 131072-column row
// adds 16K terms per lane). For the rescaled online sums (KL's W and friends) see Lse.
template <class A>
struct LongSum {
  static constexpr int W = Vec<A>::size();
  static constexpr int kFlush = 16;
  Vec<A> part{A(0)};
  double acc[W] = {};
  int n = 0;
  void fma(const Vec<A>& a, const Vec<A>& b) { part = vec::fmadd(a, b, part); }
  void add(const Vec<A>& a) { part = part + a; }
  // each value straight into the double lanes (no float partial sum: the sum of n floats is then
  // exact to ~n eps64, for means that must not round at the values' offset)
  void add_exact(const Vec<A>& a) {
    alignas(64) A t[W];
    a.store(t);
    for (int l = 0; l < W; ++l) acc[l] += double(t[l]);
  }
  void end_block() {
    if (++n == kFlush) flush();
  }
  void flush() {
    alignas(64) A t[W];
    part.store(t);
    for (int l = 0; l < W; ++l) acc[l] += double(t[l]);
    part = Vec<A>(A(0));
    n = 0;
  }
  double total() {
    flush();
    double s = 0;
    for (int l = 0; l < W; ++l) s += acc[l];
    return s;
  }
};

// The KL statistic (docs/kernel-math.md, "KL"): per lane W = sum_j exp(x_j - m_x) d_j with
// d_j = (x_j - m_x) - (y_j - r_y), m_x the lane's running max of the weighting stream x and r_y the other
// stream's value where x has that max (so that d = 0 at x's largest entry: in a saturated row the
// terms that matter are small and exact). Horizontal finish: relative to the row max Mx and the value
// Ry of y at x's row argmax, with d_l - d = (Mx - m_xl) - (Ry - r_yl) per lane,
//   sum_l exp(m_xl - Mx) (W_l - S_l ((Mx - m_xl) - (Ry - r_yl))),
// so that dbar = result / tx.S = sum_j softmax(x)_j ((x_j - Mx) - (y_j - Ry)).
// (`mass` is the lane sum of the weights of W's terms: X.s for W itself.)
template <class A>
inline double shifted_sum(const Vec<A>& W, const Vec<A>& mass, const Lse<A>& X, const LseTotal& tx,
                          const Vec<A>& ry, double Ry) {
  constexpr int W_ = Vec<A>::size();
  alignas(64) A w[W_], mx[W_], sx[W_], r[W_];
  W.store(w);
  X.m.store(mx);
  mass.store(sx);
  ry.store(r);
  alignas(64) double x[W_];
  lane_exps(X.m, tx.M, x);
  double S = 0;
  for (int l = 0; l < W_; ++l) {
    if (sx[l] == 0) continue;  // no mass in this lane (its maxima may still be `lowest`)
    S += x[l] * (double(w[l]) - double(sx[l]) * ((tx.M - mx[l]) - (Ry - r[l])));
  }
  return S;
}
// The value of `ry` in a lane where the stream X has its row max (Ry above).
template <class A>
inline double at_row_max(const Lse<A>& X, const LseTotal& tx, const Vec<A>& ry) {
  constexpr int W_ = Vec<A>::size();
  alignas(64) A mx[W_], r[W_];
  X.m.store(mx);
  ry.store(r);
  for (int l = 0; l < W_; ++l)
    if (double(mx[l]) == tx.M) return r[l];
  return 0.0;
}
// After a block updated the weighting stream's lane maxima to m: the other stream's (floored) value y
// where x holds the lane max becomes the lane's reference (unchanged where no element of the block is
// the max).
template <class A>
KD_INLINE Vec<A> track_ref(Vec<A> ref, const Vec<A>* x, const Vec<A>* y, const Vec<A>& m) {
  for (int k = 0; k < kBlock; ++k) ref = Vec<A>::blendv(ref, finite_floor(y[k]), x[k] == m);
  return ref;
}
// When a lane's max and reference move (m_x, r_y) -> (m_x', r_y') the d_j already summed shift by
// -((m_x' - m_x) - (r_y' - r_y)) and the weights rescale by r = exp(m_x - m_x'):
//   W <- r (W - S_old ((m_x' - m_x) - (r_y' - r_y))).   (S_old = 0 adds nothing: no 0 * inf.)
template <class A>
KD_INLINE Vec<A> shift_w(const Vec<A>& W, const Vec<A>& r, const Vec<A>& s_old, const Vec<A>& dmx, const Vec<A>& dmy) {
  const Vec<A> sh = Vec<A>::blendv(dmx - dmy, Vec<A>(A(0)), s_old == Vec<A>(A(0)));
  return r * vec::fnmadd(s_old, sh, W);
}

// Whether a row's one-pass KL1 (docs/kernel-math.md, rule 3) is replaced by log1p of the phi sum: when
// its cancellation costs more than 3 bits, KL1 small against the magnitude `mag` of its errors (the
// float sum dbar's, ~eps |dbar|, and the float sums S_v, S_z's, ~eps: |dbar| + 1; the row constants
// M, R are exact and l = log S is taken in double), and KL1 < 64 (the sum's large-|u| terms carry
// exp(KL1); above that the one-pass value has lost nothing that matters).
inline bool needs_refine(double KL1, double mag) { return !(KL1 > 0.125 * mag) && KL1 < 64.0; }

// w phi(x) with w = exp(lw) > 0 (DKD's binary TCKD terms): the series (phi) for moderate x, and
// exp(lw + x) - w (1 + x) for x > 1/2, which cannot overflow where w e^x is finite (w tiny, x large).
inline double wphi(double lw, double w, double x);

// phi(x) = e^x - 1 - x in double (scalar terms: DKD's binary TCKD): the series below |x| < 1/2.
inline double phi(double x) {
  if (!(std::abs(x) < 0.5)) return std::expm1(x) - x;
  double P = 1.0 / 121645100408832000.0;  // 1/19!
  double f = 121645100408832000.0;
  for (int n = 16; n >= 0; --n) {        // sum_{n=0..17} x^n / (n+2)!
    f /= double(n + 3);
    P = P * x + 1.0 / f;
  }
  return x * x * P;
}
inline double wphi(double lw, double w, double x) { return x > 0.5 ? std::exp(lw + x) - w * (1.0 + x) : w * phi(x); }

// phi(x) = e^x - 1 - x >= 0, the terms of the accurate KL (docs/kernel-math.md, "accurate loss"):
// KL = log1p(sum_j w_j phi(-u_j)) with sum_j w_j u_j = 0. Returns w phi(-u): for |u| <= 1 the series
// w u^2 sum_n (-u)^n / (n+2)! (no cancellation, relative accuracy ~ eps), else w_other * E - w + w u,
// using w e^{-u} = w_other e^{KL} with E = exp(KL1) (those terms are large: KL1's small error is harmless).
template <class A>
KD_INLINE Vec<A> phi_term(const Vec<A>& w, const Vec<A>& u, const Vec<A>& w_other, const Vec<A>& E) {
  // 1/(n+2)! for n = 0..17 (float uses n <= 9: the terms beyond are < 2^-25 of the first for |u| <= 1)
  constexpr int kTerms = std::is_same_v<A, double> ? 18 : 10;
  static constexpr double c[18] = {
      1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0, 1.0 / 87178291200.0,
      1.0 / 1307674368000.0, 1.0 / 20922789888000.0, 1.0 / 355687428096000.0,
      1.0 / 6402373705728000.0, 1.0 / 121645100408832000.0};
  const Vec<A> x = Vec<A>(A(0)) - u;
  Vec<A> P = Vec<A>(static_cast<A>(c[kTerms - 1]));
  for (int n = kTerms - 2; n >= 0; --n) P = vec::fmadd(P, x, Vec<A>(A(c[n])));
  const Vec<A> small = w * (u * u) * P;
  const Vec<A> large = vec::fmadd(w, u, vec::fmsub(w_other, E, w));
  return Vec<A>::blendv(large, small, u.abs() <= Vec<A>(A(1)));
}

template <class A>
inline double hsum(const Vec<A>& x) {
  constexpr int W = Vec<A>::size();
  alignas(64) A a[W];
  x.store(a);
  double S = 0;
  for (int l = 0; l < W; ++l) S += a[l];
  return S;
}

// log(exp(x) + exp(y)) without overflow
inline double logaddexp(double x, double y) {
  const double m = std::max(x, y);
  if (m == -INFINITY) return -INFINITY;
  return m + std::log1p(std::exp(-std::abs(x - y)));
}

// Per-row values every kind needs.
struct RowInfo {
  int64_t y;       // label's (local) column, or -1 when there are no labels or another rank holds it
  bool ce;         // compute the CE term
  double g_ce;     // grad_scale * ce_w_i (0 without CE)
  double zy;       // student logit at the label (0 without labels), read before any write
  double g_kd[kMaxTeachers];  // grad_scale * kd_w_{t,i} per teacher t
  double vy[kMaxTeachers];    // teacher t's (mixed) logit at the label (0 without labels)
  int64_t i = 0;              // the row
};
struct RowOut {
  double D[kMaxTeachers] = {};  // per teacher
  double CE = 0;
  // Phase::FINISH: term k (D[k] for the teachers, then CE at k = M) is D[k] + a[k] log1p(X[k]), or
  // D[k] + X[k] where a[k] = 0, X[k] the sum over the ranks of x[k] (kdfast/_spec.py finish_forward);
  // a = x = 0 where D / CE is already the term
  double a[kMaxTeachers + 1] = {}, x[kMaxTeachers + 1] = {};
};

// ---------------------------------------------------------------------------------------------------
// The combine of per-row statistics over ranks (Phase::FINISH): the lane finishes above (total,
// shifted_sum, at_row_max) with a rank for a lane, in double, on the all-gathered (world, N, KS) stats.
struct RankStats {
  const double* g;  // gstats
  int64_t N, KS, i;  // rows, stats per row, this row
  int world;
  double at(int r, int c) const { return g[(int64_t(r) * N + i) * KS + c]; }
  // (M, S) of a stream: M = max_r M_r over ranks with mass (NaN propagates), S = sum_r S_r exp(M_r - M)
  LseTotal lse(int cm, int cs) const {
    double M = -INFINITY;
    for (int r = 0; r < world; ++r) {
      const double s = at(r, cs), m = at(r, cm);
      if (s == 0) continue;
      M = (std::isnan(M) || std::isnan(m) || std::isnan(s)) ? NAN : std::max(M, m);
    }
    double S = 0;
    for (int r = 0; r < world; ++r) {
      const double s = at(r, cs);
      if (s != 0) S += s * std::exp(at(r, cm) - M);
    }
    return {M == -INFINITY ? double(lowest<float>()) : M, S};
  }
  // The reference R (the first rank holding the stream's max with mass) and the KL statistic W of
  // that stream: sum_r exp(M_r - M) (W_r - S_r ((M - M_r) - (R - R_r))) (shifted_sum's formula).
  void kl(int cm, int cs, int cr, int cw, const LseTotal& t, double& R, double& W) const {
    R = 0;
    for (int r = 0; r < world; ++r)
      if (at(r, cs) != 0 && at(r, cm) == t.M) { R = at(r, cr); break; }
    W = shifted(cm, cs, cs, cr, cw, t, R);
  }
  // a statistic cw kept like W with the mass cmass (LS's PCu, mass PUv), at the reference R
  double shifted(int cm, int cs, int cmass, int cr, int cw, const LseTotal& t, double R) const {
    double W = 0;
    for (int r = 0; r < world; ++r) {
      if (at(r, cs) == 0) continue;
      const double m = at(r, cm);
      W += std::exp(m - t.M) * (at(r, cw) - at(r, cmass) * ((t.M - m) - (R - at(r, cr))));
    }
    return W;
  }
  // a sum cx kept at the scale of a stream's max (rescaled_sum's formula): sum_r exp(M_r - M) x_r
  double rescaled(int cm, int cs, int cx, const LseTotal& t) const {
    double x = 0;
    for (int r = 0; r < world; ++r)
      if (at(r, cs) != 0) x += std::exp(at(r, cm) - t.M) * at(r, cx);
    return x;
  }
  double sum(int c) const {
    double x = 0;
    for (int r = 0; r < world; ++r) x += at(r, c);
    return x;
  }
};

// The KL and DKD kinds' per-row statistics in double (kdfast/_spec.py KLStat, KLTeacherStat; DKD's
// streams run over the columns j != y): the student's lse `z` at Ts, CE's `one`, per teacher its lse
// `v`, the KL statistic W with its reference R, wttm's lse `u`, and the label logits.
template <int MT>
struct KLStats {
  LseTotal z{0, 0}, one{0, 0}, v[kCap<MT>], u[kCap<MT>];
  double R[kCap<MT>] = {}, W[kCap<MT>] = {}, zy = 0, vy[kCap<MT>] = {};
  KLStats() {
    for (int t = 0; t < kCap<MT>; ++t) v[t] = u[t] = {0, 0};
  }
  // phase 1's output: this rank's row (the label logits where it holds the label, else 0)
  void store(double* st, int M, bool ce, bool own) const {
    namespace ks = klstat;
    namespace kt = klteacherstat;
    st[ks::M_Z] = z.M, st[ks::S_Z] = z.S;
    st[ks::M_ONE] = ce ? one.M : 0.0, st[ks::S_ONE] = ce ? one.S : 0.0;
    st[ks::Z_Y] = own ? zy : 0.0;
    for (int t = 0; t < M; ++t) {
      double* o = st + ks::COUNT + t * kt::COUNT;
      o[kt::M_V] = v[t].M, o[kt::S_V] = v[t].S, o[kt::R] = R[t], o[kt::W] = W[t];
      o[kt::M_U] = u[t].M, o[kt::S_U] = u[t].S, o[kt::V_Y] = own ? vy[t] : 0.0;
    }
  }
  // phase 2's input: every rank's rows combined (W over the student's stream when `rev`)
  void combine(const RankStats& g, int M, bool ce, bool ce_sep, bool rev, bool wttm) {
    namespace ks = klstat;
    namespace kt = klteacherstat;
    z = g.lse(ks::M_Z, ks::S_Z);
    if (ce) one = ce_sep ? g.lse(ks::M_ONE, ks::S_ONE) : z;
    zy = g.sum(ks::Z_Y);
    for (int t = 0; t < M; ++t) {
      const int o = ks::COUNT + t * kt::COUNT;
      v[t] = g.lse(o + kt::M_V, o + kt::S_V);
      if (rev) g.kl(ks::M_Z, ks::S_Z, o + kt::R, o + kt::W, z, R[t], W[t]);
      else g.kl(o + kt::M_V, o + kt::S_V, o + kt::R, o + kt::W, v[t], R[t], W[t]);
      if (wttm) u[t] = g.lse(o + kt::M_U, o + kt::S_U);
      vy[t] = g.sum(o + kt::V_Y);
    }
  }
};

template <class T>
inline double at_label(const T* p, int64_t y) { return y >= 0 ? static_cast<double>(p[y]) : 0.0; }

// Scalar recomputations of one column (the label's) round exactly as the vector code does: a logit
// scaled by 1/T in A, and retro_kd's teacher mix as BlockIO::load forms it. (A value computed in double
// instead differs from the lane's by up to an ulp of the logit: at |z/T| ~ 10^3 that is 6e-5 of a
// probability, against an exact 0 at the row max.)
template <class A>
inline double scaled(double x, const InvT<A>& it) {
  // (as vscale: the lo term takes max(x, lowest), so a -inf logit stays -inf, never -inf + inf)
  return it.lo == A(0) ? double(A(A(x) * it.hi))
                       : double(A(std::fma(A(x), it.hi, std::max(A(x), lowest<A>()) * it.lo)));
}
template <class A, class TZ, class TV>
inline double mixed(const Row<TZ, TV>& r, int t, int64_t y) {
  A v = A(r.v[t][y]);
  if (r.zp) v = std::fma(v, A(r.w_v), A(A(r.zp[y]) * A(r.w_zp)));
  return double(v);
}

template <class T>
inline void write_scalar(T* p, int64_t y, double x) { if (p) p[y] = static_cast<T>(x); }

template <class T>
inline void fill_row(T* p, int64_t C, double x) {
  if (!p) return;
  const T t = static_cast<T>(x);
  for (int64_t j = 0; j < C; ++j) p[j] = t;
}

// ---------------------------------------------------------------------------------------------------
// Helpers of several kinds (DKD, LM, LS, JSD, TOPK)

// Add `x` to lane `y - j0` of a block's vectors when column y lies in [j0, j0 + B): the `- [j = y]` of
// the CE gradient. One scalar test per block; the store / reload happens in one block per row.
template <class A>
inline void add_at(Vec<A>* g, int64_t j0, int64_t y, A x) {
  constexpr int W = Vec<A>::size();
  if (y < j0 || y >= j0 + int64_t(kBlock) * W) return;
  alignas(64) A buf[kBlock * W];
  for (int k = 0; k < kBlock; ++k) g[k].store(buf + k * W);
  buf[y - j0] += x;
  for (int k = 0; k < kBlock; ++k) g[k] = Vec<A>::loadu(buf + k * W);
}

// Zero the padding lanes of a special block (z = v = -inf there), for sums of plain values.
template <class A, class S>
inline Vec<A> live_only(S, const Block<A>& b, int k, const Vec<A>& x) {
  if constexpr (S::value) return Vec<A>::blendv(Vec<A>(A(0)), x, b.live[k]);
  else return x;
}

// The CE term from t1, the lse statistics of the raw student logits: (M - z_y) + log S. When the label
// holds the row's max and nearly all its mass (S - 1 < 1/8, CE < 0.118), log S cancels: the max's own
// 1 sits in a float lane beside small terms, each add rounding by ~eps32, large against a CE of 1e-3
// (found by the randomised suite with 8-lane vectors: kd + CE, C = 31, CE error 4.8x plain float32's).
// Then CE = log1p(S'), S' = sum_{j != y} exp(z_j - M) (nonnegative small terms: accurate relative to
// CE) from a sweep of its own that skips the label's column; only such rows pay it.
// (Split for Phase::FINISH: ce_cancels decides from the global statistics, ce_tail sums S' over the
// local columns, skipping the label's where this rank holds it, and the ranks' parts are summed.)
inline bool ce_cancels(const RowInfo& ri, const LseTotal& t1) { return ri.zy == t1.M && t1.S - 1.0 < 0.125; }
template <class A, class TZ, class TV>
inline double ce_tail(const Row<TZ, TV>& r, const RowInfo& ri, const LseTotal& t1);
template <class A, class TZ, class TV>
inline double ce_value(const Row<TZ, TV>& r, const RowInfo& ri, const LseTotal& t1) {
  const double ce = (t1.M - ri.zy) + t1.l();
  if (!ce_cancels(ri, t1) || r.z == nullptr) return ce;
  return std::log1p(ce_tail<A>(r, ri, t1));
}
template <class A, class TZ, class TV>
inline double ce_tail(const Row<TZ, TV>& r, const RowInfo& ri, const LseTotal& t1) {
  const A nM = A(-t1.M);
  LongSum<A> S;
  Row<TZ, TV> rz = r;  // the student's row only
  rz.zp = nullptr;
  sweep<A>(rz, ri.y, false, [&](auto, Block<A>& b, int64_t, const auto&) {
    for (int k = 0; k < kBlock; ++k) S.add(vexp(b.z[k] + Vec<A>(nM)));  // dead lanes: -inf -> 0
    S.end_block();
  });
  return S.total();
}

inline double finite_or(double x, double fallback) { return std::isfinite(x) ? x : fallback; }
inline double clamp_finite(double x) {
  return std::isnan(x) ? x : std::min(std::max(x, -1e300), 1e300);
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
