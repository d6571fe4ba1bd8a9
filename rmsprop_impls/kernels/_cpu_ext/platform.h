// The calls that only some platforms have, one small function each, with a no-op elsewhere, so
// that the kernel and its callers carry no #ifdefs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rmsprop::platform {

// The size of a transparent huge page (the PMD size): 2 MiB on x86-64 and on arm64 with 4 KiB
// pages, 512 MiB on arm64 with 64 KiB pages. 0 where there are none (macOS, or THP compiled out).
inline size_t huge_page_bytes() {
#if defined(__linux__)
  static const size_t bytes = [] {
    size_t value = 0;
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
      unsigned long long read = 0;
      if (std::fscanf(f, "%llu", &read) == 1 && read > 0 && (read & (read - 1)) == 0) {
        value = static_cast<size_t>(read);
      }
      std::fclose(f);
    }
    return value;
  }();
  return bytes;
#else
  return 0;
#endif
}

// Asks for huge pages for [p, p + bytes) as it is first touched (MADV_HUGEPAGE).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__)
  madvise(p, bytes, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

// Moves [p, p + bytes), already touched, onto huge pages now (MADV_COLLAPSE, Linux 6.1). Returns
// whether the kernel did.
inline bool collapse_to_huge_pages(void* p, size_t bytes) {
#if defined(__linux__)
  constexpr int kCollapse = 25;  // MADV_COLLAPSE; older headers lack the name
  return madvise(p, bytes, kCollapse) == 0;
#else
  (void)p, (void)bytes;
  return false;
#endif
}

}  // namespace rmsprop::platform
