// The row kernel for AVX-512 F/BW/VL/DQ (x86-64, ATen's 16-lane Vectorized<float>). setup.py compiles
// this file alone with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; kdfast.cpp calls it only when
// the running CPU has them.
#include "kernel_api.h"
#if defined(KDFAST_X86)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// GCC's AVX-512 intrinsics pass _mm512_undefined_ps() (`__m512 __Y = __Y;`) as the unused source of
// unmasked operations, which -Wuninitialized reports thousands of times after inlining: a false
// positive of the compiler's own headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "row_driver.h"

namespace kdfast::AVX512 {
void run_rows(const KernelArgs& args, int64_t begin, int64_t end) { run_rows_impl(args, begin, end); }
void log_f32(const float* x, float* y, int64_t n) { log_f32_impl(x, y, n); }
}  // namespace kdfast::AVX512
#endif
