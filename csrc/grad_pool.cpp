// A small pool of large CPU buffers for the kernels' (N, C) gradients (and the fused linear chunk
// buffers): kdfast/_ops.py `buffer`.
//
// Why: PyTorch's CPU allocator caches nothing. A fresh 500 MB gradient costs a page fault per page on
// its first touch (~100 ms on the 2-core dev machine, 2 threads; touching a reused buffer: ~25 ms),
// and a training loop pays that every step: kd + CE fwd+bwd at 4096 x 32000 fp32 took 280 ms a step
// without the pool, 170 ms with it (benchmarks/bench_steady.py). Here a buffer handed to autograd
// comes back to the pool when its storage is freed (the deleter of at::from_blob), and the next call
// of the same size reuses its pages.
//
// No transparent-huge-page advice (madvise(MADV_HUGEPAGE)): on the dev machine (THP "madvise",
// defrag "madvise") the first touch of an advised 500 MB block took 37 to 680 ms from one call to the
// next (direct compaction), against a steady ~100 ms with 4 KiB pages; the pool makes the first touch
// a one-time cost, and a predictable one is worth more than a sometimes-faster one.
//
// Bounds: free blocks are kept up to `cap` bytes (KDFAST_GRAD_POOL_MB, read by kdfast/_cpu.py;
// 0 turns the pool off), the least recently returned evicted first. Blocks are sized in 2 MiB units
// and reused for requests of up to 1.25x less: a loop of one shape always hits.
// Thread-safe: autograd may free a buffer on any thread.
#include <ATen/ATen.h>

#include <cstdlib>
#include <list>
#include <mutex>

#include "grad_pool.h"

namespace kdfast {
namespace pool {
namespace {

constexpr size_t kUnit = size_t(2) << 20;   // 2 MiB

struct Pool {
  std::mutex mu;
  std::list<std::pair<size_t, void*>> free;   // most recently returned first
  size_t free_bytes = 0, cap = size_t(4096) << 20;
  int64_t hits = 0, misses = 0, evictions = 0;
};
Pool& the_pool() {
  static Pool* p = new Pool();   // never destroyed: deleters may run during interpreter shutdown
  return *p;
}

void release(void* ptr) { std::free(ptr); }

// the caller holds the lock
void trim(Pool& P) {
  while (P.free_bytes > P.cap && !P.free.empty()) {
    auto [n, ptr] = P.free.back();
    P.free.pop_back();
    P.free_bytes -= n;
    ++P.evictions;
    release(ptr);
  }
}

void give_back(void* ptr, size_t n) {
  Pool& P = the_pool();
  std::lock_guard<std::mutex> lock(P.mu);
  if (n > P.cap) {
    release(ptr);
    return;
  }
  P.free.emplace_front(n, ptr);
  P.free_bytes += n;
  trim(P);
}

void* take(size_t want, size_t* got) {
  Pool& P = the_pool();
  std::lock_guard<std::mutex> lock(P.mu);
  auto best = P.free.end();
  for (auto it = P.free.begin(); it != P.free.end(); ++it)   // best fit within [want, 1.25 want]
    if (it->first >= want && it->first <= want + want / 4 && (best == P.free.end() || it->first < best->first))
      best = it;
  if (best == P.free.end()) {
    ++P.misses;
    return nullptr;
  }
  ++P.hits;
  void* ptr = best->second;
  *got = best->first;
  P.free_bytes -= best->first;
  P.free.erase(best);
  return ptr;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& like) {
  const auto opts = like.options();
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t want = (size_t(numel) * like.element_size() + kUnit - 1) / kUnit * kUnit;
  if (want == 0 || the_pool().cap == 0) return at::empty(sizes, opts);
  size_t n = want;
  void* ptr = take(want, &n);
  if (!ptr) {
    ptr = std::aligned_alloc(kUnit, want);
    TORCH_CHECK(ptr, "kdfast: out of memory allocating ", want, " bytes");
  }
  return at::from_blob(ptr, sizes, [n](void* p) { give_back(p, n); }, opts);
}

void set_cap(int64_t bytes) {
  Pool& P = the_pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.cap = bytes > 0 ? size_t(bytes) : 0;
  trim(P);
}

void clear() {
  Pool& P = the_pool();
  std::lock_guard<std::mutex> lock(P.mu);
  for (auto& [n, ptr] : P.free) release(ptr);
  P.free.clear();
  P.free_bytes = 0;
}

std::vector<int64_t> stats() {
  Pool& P = the_pool();
  std::lock_guard<std::mutex> lock(P.mu);
  return {P.hits, P.misses, P.evictions, int64_t(P.free.size()), int64_t(P.free_bytes), int64_t(P.cap)};
}

}  // namespace pool
}  // namespace kdfast
