// The pool of large CPU gradient buffers (csrc/grad_pool.cpp; used by kdfast/_ops.py `buffer`).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace kdfast {
namespace pool {

// An uninitialised CPU tensor of `sizes` with `like`'s dtype whose memory returns to the pool when
// its storage is freed (a plain at::empty when the pool is off).
at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& like);
// The most bytes of free blocks kept (0: off; the free blocks beyond it are released now).
void set_cap(int64_t bytes);
// Release every free block.
void clear();
// {hits, misses, evictions, free blocks, free bytes, cap}
std::vector<int64_t> stats();

}  // namespace pool
}  // namespace kdfast
