// Picks the instruction set for this CPU, once: AVX2 on x86-64 CPUs that have it, NEON on aarch64,
// the scalar loop anywhere else. All of them run loop.h and round alike, so they give the same
// bits; tests force each one the machine has through set_kernel() and compare them.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "scalar.h"
#if defined(__x86_64__)
#include "avx2.h"
#elif defined(__aarch64__)
#include "neon.h"
#endif

namespace rmsprop {

enum class Kernel { scalar, avx2, neon };

inline const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::avx2:
      return "avx2";
    case Kernel::neon:
      return "neon";
    default:
      return "scalar";
  }
}

// The kernels this build has and this CPU runs, the fastest first.
inline std::vector<Kernel> available_kernels() {
  std::vector<Kernel> kernels;
#if defined(__x86_64__)
  if (avx2::supported()) kernels.push_back(Kernel::avx2);
#elif defined(__aarch64__)
  if (neon::supported()) kernels.push_back(Kernel::neon);
#endif
  kernels.push_back(Kernel::scalar);
  return kernels;
}

// One range of one leaf with generated kernel `rule`, on the chosen instruction set. kExact: stock's
// rounding after every operation; kStreamW, kStreamS: that output is written past the cache where the
// kernel can (loop.h). The rule is found by a chain of comparisons, one per kernel: a few
// nanoseconds per call, which is per range, not per element.
template <typename T, bool kExact, bool kStreamW, bool kStreamS, int K = 0>
void update(Kernel k, int rule, const Streams<T>& a, size_t n, const Scalars& x) {
  if constexpr (K < rules::kKernels) {
    if (rule != K) {
      return update<T, kExact, kStreamW, kStreamS, K + 1>(k, rule, a, n, x);
    }
    switch (k) {
#if defined(__x86_64__)
      case Kernel::avx2:
        return avx2::update_then_clear<K, T, kExact, kStreamW, kStreamS>(a, n, x);
#elif defined(__aarch64__)
      case Kernel::neon:
        return neon::update<K, T, kExact, kStreamW, kStreamS>(a, n, x);
#endif
      default:
        return scalar::update<K, T, kExact>(a, n, x);
    }
  } else {
    throw std::invalid_argument("no generated kernel " + std::to_string(rule));
  }
}

// Orders a thread's streamed stores before its next ones: called once after its updates.
inline void fence_streams(Kernel k) {
#if defined(__x86_64__)
  if (k == Kernel::avx2) avx2::fence();
#else
  (void)k;  // NEON and the scalar loop store plainly
#endif
}

}  // namespace rmsprop
