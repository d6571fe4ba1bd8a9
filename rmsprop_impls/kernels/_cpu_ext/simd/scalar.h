// The scalar kernel, which every CPU can run and every vector kernel falls back to for its tail.
//
// It is the loop of loop.h over one float at a time, widening and narrowing through MLX's own
// float16_t and bfloat16_t, so its roundings are by construction the ones stock MLX makes.
#pragma once

#include <cmath>
#include <cstddef>

#include "mlx/types/half_types.h"

namespace rmsprop {

// Qualified: on aarch64 <arm_neon.h> declares a global ::float16_t as well.
using f16 = mlx::core::float16_t;
using bf16 = mlx::core::bfloat16_t;

// The step's scalars, as float32 values. In the stock-exact mode they are already rounded to the
// storage dtype (see rounded_to()), as stock's `lr.astype(g.dtype)` and its weakly typed Python
// constants are.
struct Hyper {
  float lr, alpha, one_minus_alpha, eps;
};

template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <typename T>
Hyper rounded_to(const Hyper& h) {
  return {round_to<T>(h.lr), round_to<T>(h.alpha), round_to<T>(h.one_minus_alpha), round_to<T>(h.eps)};
}

// Bytes ahead of the loads that the loop asks the cache for: the hardware prefetcher alone left the
// AVX2 kernel at about 44 of its 48 GB/s on the x86-64 machine it was measured on (five streams).
constexpr size_t kPrefetchBytes = 2048;

inline void prefetch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

namespace scalar {

constexpr size_t N = 1;
using V = float;

template <typename T>
inline V load(const T* p) {
  return static_cast<float>(*p);
}
template <typename T>
inline void store(T* p, V x) {
  *p = static_cast<T>(x);
}
// One float at a time has no write that skips the cache.
template <typename T>
inline void stream(T* p, V x) {
  store(p, x);
}
// Rounds to T and widens back: what storing an intermediate in stock's dtype does to it.
template <typename T>
inline V round(V x) {
  return round_to<T>(x);
}
inline V broadcast(float x) {
  return x;
}
inline V add(V a, V b) {
  return a + b;
}
inline V sub(V a, V b) {
  return a - b;
}
inline V mul(V a, V b) {
  return a * b;
}
inline V div(V a, V b) {
  return a / b;
}
inline V sqrt(V a) {
  return std::sqrt(a);
}

#include "loop.h"

}  // namespace scalar
}  // namespace rmsprop
