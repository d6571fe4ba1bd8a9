// Stands in for MLX's CUDA JIT header of the same name when a generated CUDA kernel is compiled as C++:
// __global__, __device__ and __grid_constant__ (no-ops on the host), Shape and Strides, MLX's own float16_t and
// bfloat16_t from the wheel's headers as __half and __nv_bfloat16, the _rn float intrinsics (correctly rounded
// and unfused, as the host's IEEE float operations are under -ffp-contract=off), and hsqrt and __hdiv as CUDA
// 12.9's cuda_fp16.hpp and cuda_bf16.hpp compute them on the device, with each .approx instruction
// (sqrt.approx, rcp.approx, div.approx) modelled by the correctly rounded operation: the GPU's own
// approximations are not specified bit for bit, so only test_on_the_device can check those bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "mlx/types/half_types.h"

#define __global__
#define __device__
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

// isnan on float in the global namespace, as CUDA's device math library has it (fabsf is <cmath>'s).
using std::isnan;

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

inline float __half2float(__half x) {
  return static_cast<float>(x);
}
inline __half __float2half_rn(float x) {
  return __half(x);
}
inline float __bfloat162float(__nv_bfloat16 x) {
  return static_cast<float>(x);
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  return __nv_bfloat16(x);
}

// __APPROX_FCAST(sqrt): cvt.f32.f16, sqrt.approx.ftz.f32, cvt.rn.f16.f32.
inline __half hsqrt(__half a) {
  return __half(std::sqrt(static_cast<float>(a)));
}
// bfloat16: sqrt.approx.f32, then __float2bfloat16_rn.
inline __nv_bfloat16 hsqrt(__nv_bfloat16 a) {
  return __nv_bfloat16(std::sqrt(static_cast<float>(a)));
}
// float16 __hdiv: the dividend times rcp.approx.ftz.f32 of the divisor, rounded to half; for a result under
// 0x008F (a subnormal) but not zero, one Newton correction with fmaf first.
inline __half __hdiv(__half a, __half b) {
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  const float rcp = 1.0f / fb;
  float fv = rcp * fa;
  __half v(fv);
  const float tiny = 143.0f / 16777216.0f;  // 0x008F: 143 * 2^-24
  const float magnitude = std::fabs(static_cast<float>(v));
  if (magnitude < tiny && magnitude > 0.0f) {
    const float err = std::fmaf(-fb, fv, fa);
    fv = std::fmaf(rcp, err, fv);
    v = __half(fv);
  }
  return v;
}
// bfloat16 __hdiv: div.approx.f32, with a divisor of 2^126 or more scaled by 1/4 first (and the quotient after).
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) {
  const float a_f = static_cast<float>(a);
  float b_f = static_cast<float>(b);
  const bool big = std::fabs(b_f) >= 0x1p126f;
  if (big) b_f *= 0.25f;
  float ans = a_f / b_f;
  if (big) ans = std::fmaf(ans, 0.25f, -0.0f);
  return __nv_bfloat16(ans);
}
