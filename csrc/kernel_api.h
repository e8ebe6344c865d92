// The plain-C++ interface between the binding TU (kdfast.cpp, which sees torch) and the per-ISA kernel
// TUs (kernel_<isa>.cpp, which see only ATen's vec headers). No torch types cross it.
#pragma once
#include <cstdint>

namespace kdfast {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
enum class Kind : int { KL = 0, DKD = 1, LM = 2, LS = 3, JSD = 4, TOPK = 5 };  // == kdfast/_spec.py Kind
// Which part of the row function a call runs (== kdfast/_spec.py Phase): both (the single-device entry
// points), the statistics of the local columns (stats_forward), or the finish from every rank's (finish_forward)
enum class Phase : int { FUSED = 0, STATS = 1, FINISH = 2 };
// The KL and DKD kinds' per-row statistics (== kdfast/_spec.py KLStat, KLTeacherStat): the student's, then per teacher
namespace klstat { enum : int { M_Z = 0, S_Z = 1, M_ONE = 2, S_ONE = 3, Z_Y = 4, COUNT = 5 }; }
namespace klteacherstat { enum : int { M_V = 0, S_V = 1, R = 2, W = 3, M_U = 4, S_U = 5, V_Y = 6, COUNT = 7 }; }
// The LM kind's (== kdfast/_spec.py LMStat): then one column per teacher, the sum of its logits
// JSD's round 1 (== kdfast/_spec.py JSDTeacherStat), after round 0's KLStat layout: per teacher
namespace jsdstat { enum : int { SP = 0, SQ = 1, COUNT = 2 }; }
namespace lmstat { enum : int { SUM_Z = 0, M_ONE = 1, S_ONE = 2, Z_Y = 3, COUNT = 4 }; }
// LS (== kdfast/_spec.py LSStat, LSTeacherStat): round 0 lmstat's layout, round 1 the centred squares
// (1 + M), round 2 the standardised streams' statistics: the student's, then per teacher
namespace lsstat { enum : int { M_A = 0, S_A = 1, QU = 2, COUNT = 3 }; }
namespace lsteacherstat { enum : int { M_C = 0, S_C = 1, R = 2, W = 3, PU = 4, PCU = 5, PUV = 6, COUNT = 7 }; }
// TOPK's divergence over the support buckets (== kdfast/_spec.py Divergence)
enum class Divergence : int { FORWARD = 0, REVERSE = 1, JSD = 2 };

// The layout of the fparams / iparams lists the Python layer passes (kdfast/_spec.py FParam, IParam,
// TopkFParam, TopkIParam: the same names and values; tests/test_spec.py checks it). COUNT: the length.
namespace fparam { enum : int { T_STUDENT = 0, T_TEACHER = 1, SCALE = 2, RHO = 3, ALPHA = 4, BETA = 5, COUNT = 6 }; }
namespace iparam { enum : int { KIND = 0, WTTM = 1, REVERSE = 2, CENTER = 3, HAS_CE = 4, IGNORE_INDEX = 5, COUNT = 6 }; }
namespace topk_fparam { enum : int { T = 0, SCALE = 1, BETA = 2, COUNT = 3 }; }
namespace topk_iparam { enum : int { RENORMALIZE = 0, HAS_CE = 1, IGNORE_INDEX = 2, TAIL = 3, DIVERGENCE = 4, COUNT = 5 }; }

// Teachers one kernel call reads per row (multi-teacher distillation): the row kernel keeps this many
// teachers' statistics at once; the Python layer splits more teachers into groups of this size.
constexpr int kMaxTeachers = 8;

struct KernelArgs {
  // inputs (row r of x starts at x + r * s_x elements; stride(1) == 1)
  // M teachers (1 <= M <= kMaxTeachers): teacher t's row r at v[t] + r * sv[t]; all in dtype tv.
  const void* z = nullptr;
  int M = 1;
  const void* v[kMaxTeachers] = {};  // null for TOPK (the teacher is t_lp / t_idx)
  const void* zp = nullptr;          // retro_kd past student, z's dtype, or null
  const int64_t* labels = nullptr;   // (N,) or null
  const void* kd_w = nullptr;        // (M, N) contiguous, accumulation dtype: teacher t's row weights
  const void* ce_w = nullptr;        // (N,) accumulation dtype
  double grad_scale = 1.0;
  // outputs
  void* d_out = nullptr;             // (M, N) contiguous, accumulation dtype: D per teacher and row
  void* ce_out = nullptr;            // (N,) accumulation dtype
  void* grad_z = nullptr;            // z's dtype, or null
  void* grad_v[kMaxTeachers] = {};   // v's dtype, all null or none
  int64_t N = 0, C = 0;
  int64_t sz = 0, szp = 0, sgz = 0;
  int64_t sv[kMaxTeachers] = {}, sgv[kMaxTeachers] = {};
  DType tz = DType::F32, tv = DType::F32;
  // parameters (fparams / iparams of _spec.py)
  double ts = 1, tt = 1, scale = 1, rho = 0, alpha = 1, beta = 0;  // beta: DKD's, JSD's, TOPK's JSD
  Kind kind = Kind::KL;
  bool wttm = false, reverse = false, center = true, has_ce = true;
  int64_t ignore_index = -100;
  // TOPK: the teacher's k log-probabilities (accumulation dtype) and their classes, row r at r * s_t
  const void* t_lp = nullptr;
  const int64_t* t_idx = nullptr;
  int64_t K = 0, stk = 0, sti = 0;
  bool renormalize = true;
  bool tail = false;  // the leftover masses 1 - sum_k p_k, 1 - sum_k q_{i_k} as a (k+1)-th bucket
  Divergence divergence = Divergence::FORWARD;  // REVERSE / JSD (beta: the field above) need renormalize or tail
  // Two phases (kdfast/_spec.py "Two phases"): the columns are [col0, col0 + C) of rows of `vocab`
  // columns (col0 = 0, vocab = C when FUSED); labels are global class ids.
  Phase phase = Phase::FUSED;
  int64_t col0 = 0, vocab = 0;
  int round = 0;                     // STATS: the round (kinds with more than one: JSD)
  int64_t KS = 0;                    // STATS: statistics per row of this round (stats_width)
  int64_t KG = 0;                    // gstats' statistics per row (the rounds so far, concatenated)
  double* stats = nullptr;           // STATS: (N, KS) out
  const double* gstats = nullptr;    // FINISH, STATS round > 0: (world, N, KG), every rank's stats
  int world = 1;
  double* coef = nullptr;            // FINISH: (M + 1, N) out: the loss terms' a (b in d_out / ce_out)
  double* part = nullptr;            // FINISH: (M + 1, N) out: this rank's part of the terms' X
};

// One entry point per compiled ISA: processes rows [begin, end). Defined in kernel_<isa>.cpp.
using RowsFn = void (*)(const KernelArgs&, int64_t begin, int64_t end);
// The kernel's vector log over n floats (exposed for its accuracy test only).
using LogFn = void (*)(const float* x, float* y, int64_t n);

namespace DEFAULT { void run_rows(const KernelArgs&, int64_t, int64_t); void log_f32(const float*, float*, int64_t); }
#if defined(__x86_64__) || defined(_M_X64)
#define KDFAST_X86 1
namespace AVX2 { void run_rows(const KernelArgs&, int64_t, int64_t); void log_f32(const float*, float*, int64_t); }
namespace AVX512 { void run_rows(const KernelArgs&, int64_t, int64_t); void log_f32(const float*, float*, int64_t); }
#endif

}  // namespace kdfast
