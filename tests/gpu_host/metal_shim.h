// Stands in for <metal_stdlib> and MLX's metal::utils() prelude when a generated Metal kernel is compiled as C++.
// Only what the generated kernels' source uses: address-space qualifiers (no-ops on the host), uint/uint3, MLX's
// own float16_t and bfloat16_t from the wheel's headers, metal::abs and metal::isnan (exact), and metal::precise::
// (correctly rounded, as the host's IEEE float operations are). Attributes ([[kernel]], [[buffer(n)]],
// [[thread_position_in_grid]], [[host_name(...)]]) are unknown to g++ and ignored (-Wno-attributes).
#pragma once

#include <cmath>
#include <cstdint>

#include "mlx/types/half_types.h"

#define device
#define constant

using float16_t = mlx::core::float16_t;
using bfloat16_t = mlx::core::bfloat16_t;
using uint = unsigned int;

struct uint3 {
  uint x, y, z;
};

namespace metal {
inline float abs(float x) {
  return std::fabs(x);
}
inline bool isnan(float x) {
  return std::isnan(x);
}
} // namespace metal

namespace metal::precise {
inline float sqrt(float x) {
  return std::sqrt(x);
}
inline float divide(float a, float b) {
  return a / b;
}
} // namespace metal::precise
