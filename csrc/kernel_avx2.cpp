// The row kernel for AVX2 + FMA (x86-64). setup.py compiles this file alone with -mavx2 -mfma -mf16c
// (ATen's own per-capability scheme); kdfast.cpp calls it only when the running CPU has AVX2.
#include "kernel_api.h"
#if defined(KDFAST_X86)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "row_driver.h"

namespace kdfast::AVX2 {
void run_rows(const KernelArgs& args, int64_t begin, int64_t end) { run_rows_impl(args, begin, end); }
void log_f32(const float* x, float* y, int64_t n) { log_f32_impl(x, y, n); }
}  // namespace kdfast::AVX2
#endif
