// The row kernel for the baseline ISA (ATen's portable Vectorized<T>, which the compiler vectorises for
// SSE2 on x86-64, NEON on aarch64). Runs when the CPU has nothing better, or with
// ATEN_CPU_CAPABILITY=default.
#include "kernel_api.h"
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "row_driver.h"

namespace kdfast::DEFAULT {
void run_rows(const KernelArgs& args, int64_t begin, int64_t end) { run_rows_impl(args, begin, end); }
void log_f32(const float* x, float* y, int64_t n) { log_f32_impl(x, y, n); }
}  // namespace kdfast::DEFAULT
