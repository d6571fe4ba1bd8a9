// The update loop, written once for every rule. Each kernel header includes this file inside its own
// namespace, after defining there: N (floats per vector), V (the vector), load<T>/store<T> (widen to
// and narrow from float32, rounding to nearest even), round<T> (narrow to T and widen back),
// broadcast, add, sub, mul, div, sqrt, abs, sign, maximum and clear_upper (before scalar code). No
// include guard on purpose.
//
// A rule's step is one of the kernels generated from its trace (generated/rules_kernels.h, included
// below as Rule<K>): it rounds every value of the storage dtype to T after each operation where
// kExact (stock's rounding in float16 and bfloat16), and otherwise keeps the arithmetic in float32 and
// rounds only what is stored. For float32 the two are the same. The loop loads only the state arrays
// the kernel reads and stores only the ones it changes (Rule<K>'s masks in rules_table.h).
// Multiplies and adds stay separate (the build passes -ffp-contract=off): a fused multiply-add rounds
// once where stock rounds twice.

template <typename T, bool kExact>
inline V maybe_round(V x) {
  if constexpr (kExact) {
    return round<T>(x);
  } else {
    return x;
  }
}

#include "../generated/rules_kernels.h"

// kStreamW, kStreamS: that output is memory this step does not read (a new pack or allocation, a
// spare) on a step too big for the cache to keep, so it is written past the cache with stream()
// rather than read in first by every store that misses: 20 bytes of traffic per float32 RMSprop
// parameter instead of 28. In place (a donated buffer, a free state) the lines are in the cache
// already, and plain stores are faster.
template <typename T, bool kStream>
inline void put(T* p, V x) {
  if constexpr (kStream) {
    stream(p, x);
  } else {
    store(p, x);
  }
}

template <unsigned kMask, size_t j>
constexpr bool has() {
  return (kMask >> j) & 1u;
}

// One element vector at offset k: loads what kernel K reads, steps, stores what it writes.
template <int K, typename T, bool kExact, bool kStreamW, bool kStreamS>
inline void step_at(const typename Rule<K>::template Step<T, kExact>& step, const Streams<T>& a, size_t k) {
  constexpr unsigned reads = rules::kInfo[K].reads, writes = rules::kInfo[K].writes;
  V s[rules::kMaxStates] = {}, ns[rules::kMaxStates] = {};
  if constexpr (has<reads, 0>()) s[0] = load(a.s[0] + k);
  if constexpr (has<reads, 1>()) s[1] = load(a.s[1] + k);
  V nw;
  step(load(a.w + k), load(a.g + k), s, nw, ns);
  if constexpr (has<writes, 0>()) put<T, kStreamS>(a.s_out[0] + k, ns[0]);
  if constexpr (has<writes, 1>()) put<T, kStreamS>(a.s_out[1] + k, ns[1]);
  put<T, kStreamW>(a.w_out + k, nw);
}

template <int K, typename T, bool kExact, bool kStreamW = false, bool kStreamS = false>
void update(const Streams<T>& a, size_t n, const Scalars& x) {
  static_assert(rules::kMaxStates == 2, "step_at() loads and stores two state arrays");
  constexpr unsigned reads = rules::kInfo[K].reads;
  const typename Rule<K>::template Step<T, kExact> step(x);
  constexpr size_t ahead = kPrefetchBytes / sizeof(T);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    if (N > 1 && i % (64 / sizeof(T)) < 2 * N && i + ahead < n) {
      prefetch(a.w + i + ahead);
      prefetch(a.g + i + ahead);
      if constexpr (has<reads, 0>()) prefetch(a.s[0] + i + ahead);
      if constexpr (has<reads, 1>()) prefetch(a.s[1] + i + ahead);
    }
    for (size_t k = i; k < i + 2 * N; k += N) {
      step_at<K, T, kExact, kStreamW, kStreamS>(step, a, k);
    }
  }
  if constexpr (N > 1) {
    // The scalar loop is SSE code: after this loop's dirty YMM registers it stalls (the transition
    // penalty of update_then_clear()) unless they are cleared first. update_transposed() calls this
    // once per tile row; stalling there made 4 leaves of 2048x2048 float32 take 1.8x as long.
    if (i < n) {
      clear_upper();
      ::rmsprop::scalar::update<K, T, kExact>(a.at(i), n - i, x);
    }
  } else {
    for (; i < n; ++i) {
      step_at<K, T, kExact, false, false>(step, a, i);
    }
  }
}
