// The x86-64 kernel: AVX2 arithmetic on 8 floats, F16C for float16, integer rounding for bfloat16.
//
// Compiled for AVX2 whatever the build's -march (simd.h runs it only where the CPU has it), so
// one binary runs on every x86-64 CPU. NaN is narrowed to the bits MLX's own float16_t and
// bfloat16_t give it, so a NaN that stock would produce has the same bits here.
#pragma once

#include <cpuid.h>
#include <immintrin.h>

#include "scalar.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

namespace rmsprop::avx2 {

constexpr size_t N = 8;
using V = __m256;

template <typename T>
V load(const T* p);
template <>
inline V load(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline V load(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline V load(const bf16* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline __m256i is_nan(V x) {
  return _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// 8 float16 values in the low halves of 8 lanes, rounded to nearest even; NaN as sign | 0x7D00.
inline __m128i to_f16(V x) {
  __m128i bits = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16), _mm256_set1_epi32(0x8000));
  __m256i nan32 = _mm256_or_si256(sign, _mm256_set1_epi32(0x7D00));
  __m128i nan = _mm_packus_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  __m256i mask32 = is_nan(x);
  __m128i mask = _mm_packs_epi32(_mm256_castsi256_si128(mask32), _mm256_extracti128_si256(mask32, 1));
  return _mm_blendv_epi8(bits, nan, mask);
}

// bfloat16 bits in the low half of each lane, rounded to nearest even; NaN as 0x7FC0.
inline __m256i to_bf16(V x) {
  __m256i u = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan(x));
}

inline void store(float* p, V x) {
  _mm256_storeu_ps(p, x);
}
inline void store(f16* p, V x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16(x));
}
// 8 bfloat16 values, packed into 16 bytes.
inline __m128i to_bf16_packed(V x) {
  __m256i bits = to_bf16(x);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0b1000));
}
inline void store(bf16* p, V x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_packed(x));
}

// Non-temporal stores, which need an aligned address (32 bytes for 8 floats, 16 for 8 halves):
// elsewhere a plain store. fence() orders them before what the thread does next.
inline bool aligned(const void* p, uintptr_t to) {
  return (reinterpret_cast<uintptr_t>(p) & (to - 1)) == 0;
}
inline void stream(float* p, V x) {
  aligned(p, 32) ? _mm256_stream_ps(p, x) : store(p, x);
}
inline void stream(f16* p, V x) {
  aligned(p, 16) ? _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_f16(x)) : store(p, x);
}
inline void stream(bf16* p, V x) {
  aligned(p, 16) ? _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16_packed(x)) : store(p, x);
}

template <typename T>
V round(V x);
template <>
inline V round<float>(V x) {
  return x;
}
template <>
inline V round<f16>(V x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <>
inline V round<bf16>(V x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(to_bf16(x), 16));
}

inline V broadcast(float x) {
  return _mm256_set1_ps(x);
}
inline V add(V a, V b) {
  return _mm256_add_ps(a, b);
}
inline V sub(V a, V b) {
  return _mm256_sub_ps(a, b);
}
inline V mul(V a, V b) {
  return _mm256_mul_ps(a, b);
}
inline V div(V a, V b) {
  return _mm256_div_ps(a, b);
}
inline V sqrt(V a) {
  return _mm256_sqrt_ps(a);
}
// As the scalar kernel's (scalar.h): vmaxps(a, b) gives b unless a > b, so only a NaN a needs a blend.
inline V abs(V a) {
  return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
}
inline V sign(V a) {
  const V zero = _mm256_setzero_ps();
  V above = _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
  V below = _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
  return _mm256_or_ps(above, below);
}
inline V maximum(V a, V b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}

// Dirty upper halves of the YMM registers make the SSE instructions that run next pay a transition
// penalty; this clears them.
inline void clear_upper() {
  _mm256_zeroupper();
}

#include "loop.h"

// update(), then the upper halves of the YMM registers cleared. Left dirty, they make every SSE
// instruction that runs next on this thread pay a transition penalty: MLX's CPU stream thread runs
// a share of each step, and its libm-based kernels (erfinv, so mx.random.normal) ran 45x slower.
template <int K, typename T, bool kExact, bool kStreamW, bool kStreamS>
void update_then_clear(const Streams<T>& a, size_t n, const Scalars& x) {
  update<K, T, kExact, kStreamW, kStreamS>(a, n, x);
  clear_upper();
}

// Streamed stores are weakly ordered: once per thread and step, after its last one, so that
// whoever reads the outputs next sees them. (Once per leaf, the wait for them to drain cost more
// than a 256-element leaf's update.)
inline void fence() {
  _mm_sfence();
}

}  // namespace rmsprop::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace rmsprop::avx2 {

// Whether this CPU and its OS run the kernel above, from CPUID itself: GCC's and Clang's
// __builtin_cpu_supports take different feature names (Debian's clang rejects "f16c"). AVX2 is
// leaf 7's EBX bit 5, F16C leaf 1's ECX bit 29; the OS must also save the YMM registers (OSXSAVE,
// leaf 1's ECX bit 27, then XCR0's SSE and AVX bits).
inline bool supported() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool f16c = ecx & (1u << 29), osxsave = ecx & (1u << 27);
  if (!f16c || !osxsave) return false;
  unsigned xcr0 = 0, xcr0_high = 0;
  __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
  if ((xcr0 & 0x6) != 0x6) return false;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx & (1u << 5);
}

}  // namespace rmsprop::avx2
