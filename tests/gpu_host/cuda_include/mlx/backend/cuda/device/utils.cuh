// Stands in for MLX's CUDA JIT header of the same name when a generated CUDA kernel is compiled as C++:
// __global__ and __grid_constant__ (no-ops on the host), Shape and Strides, MLX's own float16_t and bfloat16_t
// from the wheel's headers as __half and __nv_bfloat16, and the _rn float intrinsics (correctly rounded and
// unfused, as the host's IEEE float operations are under -ffp-contract=off).
#pragma once

#include <cmath>
#include <cstdint>

#include "mlx/types/half_types.h"

#define __global__
#define __grid_constant__

using __half = mlx::core::float16_t;
using __nv_bfloat16 = mlx::core::bfloat16_t;

namespace mlx::core::cu {
struct Shape {
  int32_t data[10];
  int32_t operator[](int k) const { return data[k]; }
};
struct Strides {
  int64_t data[10];
  int64_t operator[](int k) const { return data[k]; }
};
} // namespace mlx::core::cu

inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fdiv_rn(float a, float b) {
  return a / b;
}
inline float __fsqrt_rn(float x) {
  return std::sqrt(x);
}
