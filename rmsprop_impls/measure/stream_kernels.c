/* The bandwidth roof's C kernels (stream_kernels.py builds this file and loads it with ctypes).
 *
 * One pass of RMSprop's memory pattern without its arithmetic: w += g and v += g, element by element,
 * so memory sees three streams read (w, g, v) and two written in place (w, v): 20 bytes per float32
 * element, as a step moves. The streaming version writes w and v with non-temporal stores, which go
 * to memory without a read for ownership and without displacing what the caches hold. The two-state
 * pattern is Adam's, AdamW's, Adamax's and AdaDelta's: w, m and v read and written in place, g read
 * (28 bytes). The caller owns every array and passes its length; nothing here allocates or keeps a
 * pointer. */
#include <stddef.h>
#include <stdint.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifndef __has_builtin
#define __has_builtin(x) 0
#endif

void step_pattern(float *restrict w, const float *restrict g, float *restrict v, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        w[i] += g[i];
        v[i] += g[i];
    }
}

void two_state_pattern(float *restrict w, const float *restrict g, float *restrict m, float *restrict v, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        w[i] += g[i];
        m[i] += g[i];
        v[i] += g[i];
    }
}

/* 1 where step_pattern_streaming has non-temporal stores on this target, 0 where it is step_pattern. */
int streaming_stores(void) {
#if defined(__SSE2__) || __has_builtin(__builtin_nontemporal_store)
    return 1;
#else
    return 0;
#endif
}

void step_pattern_streaming(float *restrict w, const float *restrict g, float *restrict v, size_t n) {
#if defined(__SSE2__)
    if (((uintptr_t)w & 15) != ((uintptr_t)v & 15)) { /* w and v never align together: plain stores */
        step_pattern(w, g, v, n);
        return;
    }
    size_t i = 0;
    for (; i < n && ((uintptr_t)(w + i) & 15); ++i) {
        w[i] += g[i];
        v[i] += g[i];
    }
    for (; i + 4 <= n; i += 4) {
        __m128 gi = _mm_loadu_ps(g + i);
        _mm_stream_ps(w + i, _mm_add_ps(_mm_load_ps(w + i), gi));
        _mm_stream_ps(v + i, _mm_add_ps(_mm_load_ps(v + i), gi));
    }
    for (; i < n; ++i) {
        w[i] += g[i];
        v[i] += g[i];
    }
    _mm_sfence(); /* the streamed lines are visible to the next pass, on any thread */
#elif __has_builtin(__builtin_nontemporal_store)
    for (size_t i = 0; i < n; ++i) {
        __builtin_nontemporal_store(w[i] + g[i], &w[i]);
        __builtin_nontemporal_store(v[i] + g[i], &v[i]);
    }
#else
    step_pattern(w, g, v, n);
#endif
}
