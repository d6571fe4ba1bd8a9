// The update loop, written once. Each kernel header includes this file inside its own namespace,
// after defining there: N (floats per vector), V (the vector), load<T>/store<T> (widen to and
// narrow from float32, rounding to nearest even), round<T> (narrow to T and widen back),
// broadcast, add, sub, mul, div and sqrt. No include guard on purpose.
//
// Stock's order of operations:
//   v' = alpha*v + (1-alpha)*g*g
//   w' = w - lr*g / (sqrt(v') + eps)
// kExact rounds every intermediate to T, as stock does when T is float16 or bfloat16; otherwise
// the arithmetic stays in float32 and only w' and v' are rounded. For float32 the two are the same.
// Multiplies and adds stay separate (the build passes -ffp-contract=off): a fused multiply-add
// rounds once where stock rounds twice.

template <typename T, bool kExact>
inline V maybe_round(V x) {
  if constexpr (kExact) {
    return round<T>(x);
  } else {
    return x;
  }
}

template <typename T, bool kExact>
inline V step_v(V w, V g, V v, V lr, V alpha, V one_minus_alpha, V eps, V& w_out) {
  V g2 = maybe_round<T, kExact>(mul(g, g));
  V decayed = maybe_round<T, kExact>(mul(alpha, v));
  V nv = maybe_round<T, kExact>(add(decayed, maybe_round<T, kExact>(mul(one_minus_alpha, g2))));
  V denominator = maybe_round<T, kExact>(add(maybe_round<T, kExact>(sqrt(nv)), eps));
  V step = maybe_round<T, kExact>(div(maybe_round<T, kExact>(mul(lr, g)), denominator));
  w_out = sub(w, step);
  return nv;
}

// kStreamW, kStreamV: that output is memory this step does not read (a new pack or allocation, a
// spare) on a step too big for the cache to keep, so it is written past the cache with stream()
// rather than read in first by every store that misses: 20 bytes of traffic per float32 parameter
// instead of 28. In place (a donated buffer, a free v) the lines are in the cache already, and
// plain stores are faster.
template <typename T, bool kStream>
inline void put(T* p, V x) {
  if constexpr (kStream) {
    stream(p, x);
  } else {
    store(p, x);
  }
}

template <typename T, bool kExact, bool kStreamW = false, bool kStreamV = false>
void update(const T* w, const T* g, const T* v, T* w_out, T* v_out, size_t n, const Hyper& h) {
  const V lr = broadcast(h.lr), alpha = broadcast(h.alpha);
  const V one_minus_alpha = broadcast(h.one_minus_alpha), eps = broadcast(h.eps);
  constexpr size_t ahead = kPrefetchBytes / sizeof(T);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    if (N > 1 && i % (64 / sizeof(T)) < 2 * N && i + ahead < n) {
      prefetch(w + i + ahead);
      prefetch(g + i + ahead);
      prefetch(v + i + ahead);
    }
    for (size_t k = i; k < i + 2 * N; k += N) {
      V nw;
      V nv = step_v<T, kExact>(load(w + k), load(g + k), load(v + k), lr, alpha, one_minus_alpha, eps, nw);
      put<T, kStreamV>(v_out + k, nv);
      put<T, kStreamW>(w_out + k, nw);
    }
  }
  if constexpr (N > 1) {
    ::rmsprop::scalar::update<T, kExact>(w + i, g + i, v + i, w_out + i, v_out + i, n - i, h);
  } else {
    for (; i < n; ++i) {
      V nw;
      V nv = step_v<T, kExact>(load(w + i), load(g + i), load(v + i), lr, alpha, one_minus_alpha, eps, nw);
      store(v_out + i, nv);
      store(w_out + i, nw);
    }
  }
}
