// The aarch64 kernel: NEON arithmetic on 4 floats (every aarch64 CPU has NEON). float16 widens and
// narrows with vcvt, bfloat16 with integer shifts and round-to-nearest-even, so no FP16 or BF16
// arithmetic extension is needed. NaN is narrowed to the bits MLX's own types give it.
#pragma once

#include <arm_neon.h>

#include "scalar.h"

namespace rmsprop::neon {

constexpr size_t N = 4;
using V = float32x4_t;

template <typename T>
V load(const T* p);
template <>
inline V load(const float* p) {
  return vld1q_f32(p);
}
template <>
inline V load(const f16* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
template <>
inline V load(const bf16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}

inline uint32x4_t is_nan(V x) {
  return vmvnq_u32(vceqq_f32(x, x));
}

// Rounded to nearest even by the FPCR's default mode; NaN as sign | 0x7D00.
inline uint16x4_t to_f16(V x) {
  uint16x4_t bits = vreinterpret_u16_f16(vcvt_f16_f32(x));
  uint16x4_t sign = vand_u16(vshrn_n_u32(vreinterpretq_u32_f32(x), 16), vdup_n_u16(0x8000));
  uint16x4_t nan = vorr_u16(sign, vdup_n_u16(0x7D00));
  return vbsl_u16(vmovn_u32(is_nan(x)), nan, bits);
}

// bfloat16 bits in the low half of each lane, rounded to nearest even; NaN as 0x7FC0.
inline uint32x4_t to_bf16(V x) {
  uint32x4_t u = vreinterpretq_u32_f32(x);
  uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  uint32x4_t rounded = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
  return vbslq_u32(is_nan(x), vdupq_n_u32(0x7FC0), rounded);
}

inline void store(float* p, V x) {
  vst1q_f32(p, x);
}
inline void store(f16* p, V x) {
  vst1_u16(reinterpret_cast<uint16_t*>(p), to_f16(x));
}
inline void store(bf16* p, V x) {
  vst1_u16(reinterpret_cast<uint16_t*>(p), vmovn_u32(to_bf16(x)));
}
// NEON has no non-temporal store intrinsic (STNP is only a hint): fresh outputs are stored plainly.
template <typename T>
inline void stream(T* p, V x) {
  store(p, x);
}

template <typename T>
V round(V x);
template <>
inline V round<float>(V x) {
  return x;
}
template <>
inline V round<f16>(V x) {
  return vcvt_f32_f16(vcvt_f16_f32(x));
}
template <>
inline V round<bf16>(V x) {
  return vreinterpretq_f32_u32(vshlq_n_u32(to_bf16(x), 16));
}

inline V broadcast(float x) {
  return vdupq_n_f32(x);
}
inline V add(V a, V b) {
  return vaddq_f32(a, b);
}
inline V sub(V a, V b) {
  return vsubq_f32(a, b);
}
inline V mul(V a, V b) {
  return vmulq_f32(a, b);
}
inline V div(V a, V b) {
  return vdivq_f32(a, b);
}
inline V sqrt(V a) {
  return vsqrtq_f32(a);
}
// As the scalar kernel's (scalar.h); not vmaxq_f32, which orders -0 below +0 and returns either NaN.
inline V abs(V a) {
  return vabsq_f32(a);
}
inline V sign(V a) {
  const V zero = vdupq_n_f32(0.0f);
  uint32x4_t above = vandq_u32(vcgtq_f32(a, zero), vreinterpretq_u32_f32(vdupq_n_f32(1.0f)));
  uint32x4_t below = vandq_u32(vcltq_f32(a, zero), vreinterpretq_u32_f32(vdupq_n_f32(-1.0f)));
  return vreinterpretq_f32_u32(vorrq_u32(above, below));
}
inline V maximum(V a, V b) {
  return vbslq_f32(is_nan(a), a, vbslq_f32(vcgtq_f32(a, b), a, b));
}

// NEON and the scalar loop share their registers without a transition penalty.
inline void clear_upper() {}

#include "loop.h"

inline bool supported() {
  return true;
}

}  // namespace rmsprop::neon
