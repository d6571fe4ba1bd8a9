// 8x8 blocks of 32- or 16-bit elements transposed, on the instruction set simd.h picked: a Linear's
// weight gradient arrives transposed from backward, and update_transposed() (rmsprop_cpu.cpp)
// gathers it tile by tile into w's order before the update. Element by element, that gather was a
// third of such a step (2048x2048 float32); in registers it is a few shuffles per 8 rows.
//
// Invariant: every version moves bits only (no float arithmetic), so all give the same tile.
// transpose8(in, in_stride, out, out_stride): out[j * out_stride + i] = in[i * in_stride + j] for
// i, j < 8, the strides in elements; in and out do not overlap.
#pragma once

#include <cstddef>
#include <cstdint>

#include "simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace rmsprop {

constexpr size_t kTransposeBlock = 8;

namespace scalar {
template <typename E>
inline void transpose8(const E* in, size_t in_stride, E* out, size_t out_stride) {
  for (size_t i = 0; i < kTransposeBlock; ++i) {
    for (size_t j = 0; j < kTransposeBlock; ++j) {
      out[j * out_stride + i] = in[i * in_stride + j];
    }
  }
}
}  // namespace scalar

#if defined(__x86_64__)
namespace avx2 {

// Interleaved pairs, then quads, then the 128-bit halves swapped across the eight rows.
__attribute__((target("avx2"))) inline void transpose8(const uint32_t* in, size_t in_stride, uint32_t* out,
                                                       size_t out_stride) {
  __m256 r[8], t[8], u[8];
  for (size_t i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(in + i * in_stride));
  for (size_t i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (size_t i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (size_t j = 0; j < 4; ++j) {
    _mm256_storeu_ps(reinterpret_cast<float*>(out + j * out_stride), _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
    _mm256_storeu_ps(reinterpret_cast<float*>(out + (j + 4) * out_stride), _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
  }
  _mm256_zeroupper();  // as clear_upper() (avx2.h): SSE code may run next on this thread
}

// 16-, 32-, then 64-bit interleaves of 128-bit rows (VEX-encoded, so no upper halves to clear).
__attribute__((target("avx2"))) inline void transpose8(const uint16_t* in, size_t in_stride, uint16_t* out,
                                                       size_t out_stride) {
  __m128i r[8], b[8], c[8];
  for (size_t i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_stride));
  for (size_t i = 0; i < 8; i += 2) {
    b[i] = _mm_unpacklo_epi16(r[i], r[i + 1]);
    b[i + 1] = _mm_unpackhi_epi16(r[i], r[i + 1]);
  }
  for (size_t i = 0; i < 8; i += 4) {
    c[i] = _mm_unpacklo_epi32(b[i], b[i + 2]);
    c[i + 1] = _mm_unpackhi_epi32(b[i], b[i + 2]);
    c[i + 2] = _mm_unpacklo_epi32(b[i + 1], b[i + 3]);
    c[i + 3] = _mm_unpackhi_epi32(b[i + 1], b[i + 3]);
  }
  for (size_t j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * j * out_stride), _mm_unpacklo_epi64(c[j], c[j + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (2 * j + 1) * out_stride), _mm_unpackhi_epi64(c[j], c[j + 4]));
  }
}

}  // namespace avx2
#elif defined(__aarch64__)
namespace neon {

// Four 4x4 blocks, each by trn of row pairs and a swap of 64-bit halves; block (a, b) goes to (b, a).
inline void transpose8(const uint32_t* in, size_t in_stride, uint32_t* out, size_t out_stride) {
  for (size_t a = 0; a < 8; a += 4) {
    for (size_t b = 0; b < 8; b += 4) {
      const uint32_t* p = in + a * in_stride + b;
      uint32x4x2_t t01 = vtrnq_u32(vld1q_u32(p), vld1q_u32(p + in_stride));
      uint32x4x2_t t23 = vtrnq_u32(vld1q_u32(p + 2 * in_stride), vld1q_u32(p + 3 * in_stride));
      uint32_t* q = out + b * out_stride + a;
      vst1q_u32(q, vcombine_u32(vget_low_u32(t01.val[0]), vget_low_u32(t23.val[0])));
      vst1q_u32(q + out_stride, vcombine_u32(vget_low_u32(t01.val[1]), vget_low_u32(t23.val[1])));
      vst1q_u32(q + 2 * out_stride, vcombine_u32(vget_high_u32(t01.val[0]), vget_high_u32(t23.val[0])));
      vst1q_u32(q + 3 * out_stride, vcombine_u32(vget_high_u32(t01.val[1]), vget_high_u32(t23.val[1])));
    }
  }
}

// trn of 16-bit pairs, then of 32-bit pairs, then the 64-bit halves of rows 0-3 and 4-7 combined.
inline void transpose8(const uint16_t* in, size_t in_stride, uint16_t* out, size_t out_stride) {
  uint16x8x2_t t[4];
  for (size_t i = 0; i < 4; ++i) {
    t[i] = vtrnq_u16(vld1q_u16(in + 2 * i * in_stride), vld1q_u16(in + (2 * i + 1) * in_stride));
  }
  for (size_t half = 0; half < 2; ++half) {  // columns 2k + half
    uint32x4x2_t top = vtrnq_u32(vreinterpretq_u32_u16(t[0].val[half]), vreinterpretq_u32_u16(t[1].val[half]));
    uint32x4x2_t bottom = vtrnq_u32(vreinterpretq_u32_u16(t[2].val[half]), vreinterpretq_u32_u16(t[3].val[half]));
    for (size_t k = 0; k < 2; ++k) {  // top.val[k] holds columns half + 2k and half + 2k + 4
      vst1q_u16(out + (half + 2 * k) * out_stride,
                vreinterpretq_u16_u32(vcombine_u32(vget_low_u32(top.val[k]), vget_low_u32(bottom.val[k]))));
      vst1q_u16(out + (half + 2 * k + 4) * out_stride,
                vreinterpretq_u16_u32(vcombine_u32(vget_high_u32(top.val[k]), vget_high_u32(bottom.val[k]))));
    }
  }
}

}  // namespace neon
#endif

template <typename E>
inline void transpose8(Kernel k, const E* in, size_t in_stride, E* out, size_t out_stride) {
  switch (k) {
#if defined(__x86_64__)
    case Kernel::avx2:
      return avx2::transpose8(in, in_stride, out, out_stride);
#elif defined(__aarch64__)
    case Kernel::neon:
      return neon::transpose8(in, in_stride, out, out_stride);
#endif
    default:
      return scalar::transpose8(in, in_stride, out, out_stride);
  }
}

}  // namespace rmsprop
