// The scalar kernel, which every CPU can run and every vector kernel falls back to for its tail.
//
// It is the loop of loop.h over one float at a time, widening and narrowing through MLX's own
// float16_t and bfloat16_t, so its roundings are by construction the ones stock MLX makes.
#pragma once

#include <cmath>
#include <cstddef>

#include "../generated/rules_table.h"
#include "mlx/types/half_types.h"

namespace rmsprop {

// Qualified: on aarch64 <arm_neon.h> declares a global ::float16_t as well.
using f16 = mlx::core::float16_t;
using bf16 = mlx::core::bfloat16_t;

// The step's scalars, as float32 values, for every kernel alike: the learning rate, the rule's
// per-step inputs (Adam's bias corrections) and its slots (hyper-parameters and numbers folded from
// them, generate.py). A kernel rounds them to the storage dtype itself where stock does.
struct Scalars {
  float lr = 0.0f;
  float step[rules::kMaxStepInputs] = {};
  float slots[rules::kMaxSlots > 0 ? rules::kMaxSlots : 1] = {};
};

// One range of one leaf: w, g, the rule's state arrays (null where the kernel neither loads nor stores
// one) and the outputs. at(i) moves every pointer that is set i elements on.
template <typename T>
struct Streams {
  const T* w;
  const T* g;
  const T* s[rules::kMaxStates];
  T* w_out;
  T* s_out[rules::kMaxStates];

  Streams at(size_t i) const {
    Streams out = *this;
    out.w += i, out.g += i, out.w_out += i;
    for (size_t j = 0; j < rules::kMaxStates; ++j) {
      out.s[j] = s[j] ? s[j] + i : nullptr;
      out.s_out[j] = s_out[j] ? s_out[j] + i : nullptr;
    }
    return out;
  }
};

template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
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
// abs, sign and maximum as MLX's CPU back-end computes them (mlx/backend/cpu/unary_ops.h and
// binary_ops.h), checked against mx.abs, mx.sign and mx.maximum: abs clears the sign bit, NaN's too;
// sign is (a > 0) - (a < 0), so +0 for ±0 and for NaN; maximum(a, b) is a where a is NaN, else
// a > b ? a : b (so b for ±0 against ±0, and a NaN b).
inline V abs(V a) {
  return std::fabs(a);
}
inline V sign(V a) {
  return a > 0.0f ? 1.0f : (a < 0.0f ? -1.0f : 0.0f);
}
inline V maximum(V a, V b) {
  return std::isnan(a) ? a : (a > b ? a : b);
}

// Nothing to clear: this is the scalar code.
inline void clear_upper() {}

#include "loop.h"

}  // namespace scalar
}  // namespace rmsprop
