// One fused, multi-tensor, threaded optimizer step for MLX's CPU back-end, for every rule.
//
// Nothing here names a rule: a step runs one of the kernels generated from the rules' traces
// (generated/, written by generate.py), by its index, with its slot values, the learning rate and
// the rule's per-step inputs. A kernel reads 0 to 2 state arrays and writes some of them
// (rules::kInfo); every path below carries the states it uses and no others.
//
// Leaves of kEagerMaxElements or more: an OptimizerStep node takes the w, g and read states of up
// to kLeavesPerNode leaves plus the step's scalars and yields their new w and written states,
// reusing input buffers nobody else holds (donation). Smaller leaves are updated at once, outside
// the graph (as graph nodes they would cost MLX more than their work), each new w and state in
// memory of its own, except where in_place.h allows a state to be overwritten and the new w to go
// into the w of the step before last. After the first step, step_tree() walks the trees here too.
// Either way the elements are split evenly over a persistent thread pool (MLX's CPU back-end runs
// each task on one thread) and each thread streams its share once, with the vector kernel
// simd/simd.h picks for this CPU (AVX2, NEON, or the scalar loop) and software prefetch, rounding
// as stock does (precision "stock") or once from float32 (precision "float32").

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "in_place.h"
#include "mlx_compat.h"
#include "platform.h"
#include "generated/rules_formula.h"
#include "simd/simd.h"
#include "simd/transpose.h"
#include "tree_walk.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx::core;
using rmsprop::bf16;
using rmsprop::f16;
using rmsprop::Scalars;
using rmsprop::rules::kMaxStates;
using rmsprop::Kernel;
using rmsprop::in_place::Candidate;
using rmsprop::in_place::evaluated;
using rmsprop::in_place::GcPaused;
using rmsprop::in_place::handles;
using rmsprop::in_place::keep_disjoint_and_unshared;
using rmsprop::in_place::unseen_alone;

namespace {

// ---------------------------------------------------------------- threads ---

// Workers park on a condition variable between steps, so a step costs a
// wake-up, not a thread spawn. The calling thread always does share 0.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    grow(n - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_threads_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    wake_.notify_all();
    // The workers run `fn`, which lives in the caller's frame: wait for them even if share 0 throws.
    std::exception_ptr error;
    try {
      fn(0);
    } catch (...) {
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    if (!error) {
      error = std::exchange(worker_error_, nullptr);
    }
    worker_error_ = nullptr;
    if (error) {
      std::rethrow_exception(error);
    }
  }

 private:
  void grow(int n_workers) {
    while (static_cast<int>(workers_.size()) < n_workers) {
      int index = static_cast<int>(workers_.size()) + 1;
      // The worker waits for the job after the current generation, even if it starts late.
      workers_.emplace_back([this, index, seen = generation_] { work(index, seen); });
      workers_.back().detach();
    }
  }

  void work(int index, uint64_t seen) {
    while (true) {
      const std::function<void(int)>* job;
      int threads;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        threads = job_threads_;
      }
      if (index >= threads) {
        continue;
      }
      std::exception_ptr error;
      try {
        (*job)(index);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !worker_error_) {
        worker_error_ = error;
      }
      if (--pending_ == 0) {
        done_.notify_one();
      }
    }
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr worker_error_;
};

// Never destroyed: parked workers would otherwise have to be joined from a
// static destructor while MLX's scheduler may still be tearing down. A forked
// child has none of the parent's workers, so it gets a fresh pool (see below).
Pool* the_pool = new Pool();
Pool& pool() {
  return *the_pool;
}

std::atomic<uint64_t> donated_buffers{0};

// ---------------------------------------------------------------- buffers ---

// `x` rounded up to a multiple of `to`, a power of two.
constexpr uintptr_t round_up(uintptr_t x, uintptr_t to) {
  return (x + to - 1) & ~(to - 1);
}

// Points `out` at `byte_offset` into `base`'s buffer, as a row-major array (MLX's flags for one).
void share_row_major(array& out, const array& base, size_t byte_offset) {
  array::Flags flags;
  flags.contiguous = true;
  flags.row_contiguous = true;
  auto longest = std::max_element(out.shape().begin(), out.shape().end());
  flags.col_contiguous = out.size() <= 1 || static_cast<size_t>(*longest) == out.size();
  out.copy_shared_buffer(base, out.strides(), flags, out.size(), static_cast<int64_t>(byte_offset / out.itemsize()));
}

// ------------------------------------------------------------- huge pages ---

// NumPy asks for transparent huge pages on every large array and MLX's CPU allocator does not.
// With 4 KiB pages this kernel's five streams ran at about 85% of the triad (which NumPy runs on
// huge pages); on 2 MiB pages at about 100% (measured in C on the same machine). A buffer that
// the same MLX allocation holds on two steps is long-lived (a parameter or v updated in place, a
// gradient the caller reuses) and is moved onto huge pages once. A fresh allocation, even at a
// reused address, is left alone: moving it would copy it on every step. Only the speed depends
// on this: the calls change no values, and a kernel without MADV_COLLAPSE just refuses them.
class HugePages {
 public:
  void use_for(const void* data, size_t bytes, const std::weak_ptr<array::Data>& owner) {
    auto [lo, hi] = whole_huge_pages(data, bytes);
    if (hi <= lo) {
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto [it, first] = seen_.try_emplace(lo);
      Sighting& seen = it->second;
      bool same_allocation = !seen.owner.expired() && !seen.owner.owner_before(owner) && !owner.owner_before(seen.owner);
      if (first || !same_allocation) {
        seen = {owner, false};
        forget_freed_if_full();
        return;
      }
      if (seen.moved) {
        return;
      }
      seen.moved = true;
    }
    rmsprop::platform::advise_huge_pages(reinterpret_cast<void*>(lo), hi - lo);
    tries_.fetch_add(1, std::memory_order_relaxed);
    if (rmsprop::platform::collapse_to_huge_pages(reinterpret_cast<void*>(lo), hi - lo)) {
      moves_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Whether a buffer this big gains from starting on a huge page. MLX's large buffers start just
  // past a page boundary, which leaves a 4 MiB buffer half on small pages; beyond 1 GiB the
  // edges hardly matter.
  static bool worth_aligning(size_t bytes) {
    size_t huge = rmsprop::platform::huge_page_bytes();
    return huge > 0 && bytes >= huge && bytes <= std::max(huge, size_t(1) << 30);
  }

  static bool starts_on_huge_page(const void* data) {
    return reinterpret_cast<uintptr_t>(data) % rmsprop::platform::huge_page_bytes() == 0;
  }

  // Gives `out` a fresh buffer that starts on a huge-page boundary and gets huge pages as it is
  // first written. The slack in front is never touched: it costs address space, not memory.
  static void set_aligned_data(array& out) {
    const size_t huge = rmsprop::platform::huge_page_bytes();
    size_t bytes = out.nbytes();
    array base(allocator::malloc(bytes + huge), Shape{static_cast<ShapeElem>(bytes + huge)}, uint8);
    uintptr_t start = reinterpret_cast<uintptr_t>(base.data<void>());
    size_t offset = round_up(start, huge) - start;
    share_row_major(out, base, offset);
    rmsprop::platform::advise_huge_pages(reinterpret_cast<void*>(start + offset), bytes & ~(huge - 1));
  }

  uint64_t moves() const {
    return moves_.load();
  }

  uint64_t tries() const {
    return tries_.load();
  }

 private:
  struct Sighting {
    std::weak_ptr<array::Data> owner;  // weak: a freed buffer expires here
    bool moved;
  };

  // The huge-page-aligned part of a buffer: advice outside it would reach other allocations.
  static std::pair<uintptr_t, uintptr_t> whole_huge_pages(const void* data, size_t bytes) {
    const uintptr_t huge = rmsprop::platform::huge_page_bytes();
    if (huge == 0) {
      return {0, 0};
    }
    uintptr_t start = reinterpret_cast<uintptr_t>(data);
    return {round_up(start, huge), (start + bytes) & ~(huge - 1)};
  }

  void forget_freed_if_full() {
    if (seen_.size() < kMaxSightings) {
      return;
    }
    for (auto it = seen_.begin(); it != seen_.end();) {
      it = it->second.owner.expired() ? seen_.erase(it) : std::next(it);
    }
    if (seen_.size() >= kMaxSightings) {
      seen_.clear();
    }
  }

  static constexpr size_t kMaxSightings = 4096;
  std::mutex mutex_;
  std::unordered_map<uintptr_t, Sighting> seen_;
  std::atomic<uint64_t> moves_{0};
  std::atomic<uint64_t> tries_{0};  // moves asked for; the kernel may refuse one (no free huge page now)
};

// Leaked like the pool: a CPU task still queued in MLX's (deliberately leaked) scheduler at exit
// may still use it after static destructors have run.
HugePages* the_huge_pages = new HugePages();

// fork(): the child has only the forking thread, so the pool's workers are gone, and a mutex that
// another thread held at the fork stays locked for good. The child starts on fresh objects; the
// old ones are leaked, never unlocked or destroyed.
const bool fork_handler_installed = [] {
  return pthread_atfork(nullptr, nullptr, [] {
           the_pool = new Pool();
           the_huge_pages = new HugePages();
         }) == 0;
}();

// ------------------------------------------------------------------ rules ---

// What a step computes: one of the kernels generated from the rules' traces (generated/, by
// generate.py), and the values of its slots (the hyper-parameters and the numbers folded from them).
// Python finds the kernel by its trace's signature, so this file never knows which rule it runs.
struct RuleStep {
  int kernel = 0;
  std::vector<double> slots;

  const rmsprop::rules::Info& info() const {
    return rmsprop::rules::kInfo[kernel];
  }
  bool reads(size_t j) const {
    return (info().reads >> j) & 1u;
  }
  bool writes(size_t j) const {
    return (info().writes >> j) & 1u;
  }
  bool uses(size_t j) const {
    return reads(j) || writes(j);
  }
  size_t states() const {
    return info().states;
  }
  size_t step_inputs() const {
    return info().step_inputs;
  }

  static RuleStep of(int kernel, std::vector<double> slots) {
    if (kernel < 0 || kernel >= rmsprop::rules::kKernels) {
      throw std::invalid_argument("cpu_kernel: no generated kernel " + std::to_string(kernel) + "; there are " +
                                  std::to_string(rmsprop::rules::kKernels));
    }
    RuleStep r{kernel, std::move(slots)};
    if (r.slots.size() != r.info().slots) {
      throw std::invalid_argument("cpu_kernel: kernel " + std::string(r.info().name) + " takes " +
                                  std::to_string(r.info().slots) + " slot values, not " +
                                  std::to_string(r.slots.size()));
    }
    return r;
  }

  // The step's float32 scalars; lr and the step inputs are filled in once their arrays are evaluated.
  Scalars scalars() const {
    Scalars x;
    for (size_t k = 0; k < slots.size(); ++k) {
      x.slots[k] = static_cast<float>(slots[k]);
    }
    return x;
  }

  bool operator==(const RuleStep& o) const {
    return kernel == o.kernel && slots == o.slots;
  }
};

// The kernel every step runs: picked once, the fastest this CPU has; tests switch it.
std::atomic<Kernel> active_kernel{rmsprop::available_kernels().front()};

// ------------------------------------------------------------------ leaves ---

struct Leaf {
  const void* w;
  const void* g;
  const void* s[kMaxStates] = {};  // the rule's state arrays; null where the kernel does not load one
  void* w_out;
  void* s_out[kMaxStates] = {};  // null where the kernel does not store one
  size_t size;
  Dtype::Val dtype;
  size_t itemsize;
  // Whether the kernel writes w_out and s_out past the cache (loop.h): not memory it reads in this
  // step (a fresh allocation, a spare, not a state in place) and a step of kStreamMinBytes or more.
  bool stream_w = false, stream_s = false;
  // The allocations behind w_out, g and s_out, which the huge-page move keys on. Weak: a handle
  // here must not count as a holder when the next step asks whether it may donate a buffer.
  std::weak_ptr<array::Data> w_owner, g_owner, s_owner[kMaxStates];
  // Where g is the transpose of a row-major matrix (a Linear's weight gradient): w's columns, and g
  // is read tile by tile (update_transposed()); 0 where g is row-major like w and the states.
  size_t g_transposed_columns = 0;
};

// The two numeric contracts (docs/kernels/cpu.md): stock's, which rounds lr, the constants and
// every intermediate to the storage dtype as the stock class does, and one rounding from float32.
enum class Precision { stock, float32 };

Precision parse_precision(const std::string& name) {
  if (name == "stock") return Precision::stock;
  if (name == "float32") return Precision::float32;
  throw std::invalid_argument("cpu_kernel: precision must be \"stock\" or \"float32\", not \"" + name + "\"");
}

// One launch's work beyond the leaves: the kernel, its scalars and the contract.
struct Job {
  int kernel;
  Scalars x;
  Precision precision;
};

template <typename T, bool kStreamW, bool kStreamS>
void update_range(const Leaf& leaf, size_t lo, size_t hi, const Job& job) {
  rmsprop::Streams<T> a{static_cast<const T*>(leaf.w), static_cast<const T*>(leaf.g), {}, static_cast<T*>(leaf.w_out), {}};
  for (size_t j = 0; j < kMaxStates; ++j) {
    a.s[j] = static_cast<const T*>(leaf.s[j]);
    a.s_out[j] = static_cast<T*>(leaf.s_out[j]);
  }
  Kernel k = active_kernel.load(std::memory_order_relaxed);
  if (job.precision == Precision::stock) {
    rmsprop::update<T, true, kStreamW, kStreamS>(k, job.kernel, a.at(lo), hi - lo, job.x);
  } else {
    rmsprop::update<T, false, kStreamW, kStreamS>(k, job.kernel, a.at(lo), hi - lo, job.x);
  }
}

template <typename T>
void update_range(const Leaf& leaf, size_t lo, size_t hi, const Job& job) {
  if (!leaf.stream_w) {
    update_range<T, false, false>(leaf, lo, hi, job);
  } else if (leaf.stream_s) {
    update_range<T, true, true>(leaf, lo, hi, job);
  } else {
    update_range<T, true, false>(leaf, lo, hi, job);
  }
}

void update_leaf_range(const Leaf& leaf, size_t lo, size_t hi, const Job& job) {
  switch (leaf.dtype) {
    case Dtype::Val::float32:
      // float32 has the bits for both contracts to be the same: one instantiation.
      return update_range<float>(leaf, lo, hi, {job.kernel, job.x, Precision::float32});
    case Dtype::Val::float16:
      return update_range<f16>(leaf, lo, hi, job);
    default:
      return update_range<bf16>(leaf, lo, hi, job);
  }
}

// Below this many elements a step is faster on one thread than waking others.
constexpr size_t kMinElementsPerThread = 1 << 15;
// Thread shares start on 64-element boundaries so no two threads write one cache line.
constexpr size_t kShareAlign = 64;

// Asks the cache for `bytes` from `p`, where `p` is set.
void prefetch_run(const void* p, size_t bytes) {
  for (size_t at = 0; p && at < bytes; at += 64) {
    __builtin_prefetch(static_cast<const char*>(p) + at);
  }
}

// Asks the cache for the first lines of a leaf's inputs while the leaf before it is updated: the
// kernel's own prefetch runs ahead within a leaf, and a small leaf ends before it starts.
void prefetch_start(const Leaf& leaf) {
  size_t bytes = std::min<size_t>(leaf.size * leaf.itemsize, 256);
  for (const void* p : {leaf.w, leaf.g, leaf.s[0], leaf.s[1]}) prefetch_run(p, bytes);
}

void update_all(const std::vector<Leaf>& leaves, const Job& job, int max_threads) {
  std::vector<size_t> starts(leaves.size() + 1, 0);
  for (size_t i = 0; i < leaves.size(); ++i) {
    starts[i + 1] = starts[i] + leaves[i].size;
  }
  size_t total = starts.back();
  int threads = static_cast<int>(std::clamp<size_t>(total / kMinElementsPerThread, 1, max_threads));
  auto share = [&](int t) {
    size_t lo = std::min(total, (total / threads * t) / kShareAlign * kShareAlign);
    size_t hi = t + 1 == threads ? total : std::min(total, (total / threads * (t + 1)) / kShareAlign * kShareAlign);
    size_t i = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
    for (; i < leaves.size() && starts[i] < hi; ++i) {
      size_t a = std::max(lo, starts[i]) - starts[i];
      size_t b = std::min(hi, starts[i + 1]) - starts[i];
      if (i + 1 < leaves.size() && starts[i + 1] < hi) {
        prefetch_start(leaves[i + 1]);
      }
      if (a < b) {
        update_leaf_range(leaves[i], a, b, job);
      }
    }
    rmsprop::fence_streams(active_kernel.load(std::memory_order_relaxed));
  };
  pool().run(threads, share);
}

// Whether `x` is the transpose of a row-major matrix: a Linear's weight gradient arrives so from
// backward (MLX's vjp of x @ W.T transposes x.T @ dy).
bool is_transposed_matrix(const array& x) {
  return x.ndim() == 2 && x.strides()[0] == 1 && x.strides()[1] == x.shape(0) && x.data_size() == x.size();
}

// Tiles of a transposed gradient: this many rows of w by this many columns (64 KiB of float32, in
// L2 while the tile is updated). Square, so that the runs read from g (a column of the tile) are as
// long as those read from w (a row of it): 512 bytes, where 32x128 tiles read 128 from g. The tile's
// rows lie kTilePad elements further apart than their length: 512 bytes apart, the stores of one
// column fell into a few cache sets, and the step took twice as long (4 leaves of 2048x2048
// float32; 32 to 256 rows and columns tried).
constexpr size_t kTileRows = 128, kTileColumns = 128, kTilePad = 16, kTileStride = kTileColumns + kTilePad;

// `p` moved `bytes` on, where it is set.
template <typename P>
P offset(P p, size_t bytes) {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<P>>, const char, char>;
  return p ? static_cast<P>(static_cast<Byte*>(p) + bytes) : nullptr;
}

// Columns [c0, c1) of g's rows [r0, r1), r1 - r0 and c1 - c0 at most kTileRows and kTileColumns, into
// `out` in w's order (`stride` elements a row): 8x8 blocks in registers (simd/transpose.h), the ragged
// edges one element at a time.
template <typename Element>
void gather_tile(Kernel k, const Element* g, size_t rows, size_t r0, size_t r1, size_t c0, size_t c1, Element* out,
                 size_t stride) {
  constexpr size_t b = rmsprop::kTransposeBlock;
  const size_t r_blocks = r0 + (r1 - r0) / b * b, c_blocks = c0 + (c1 - c0) / b * b;
  for (size_t c = c0; c < c_blocks; c += b) {
    for (size_t r = r0; r < r_blocks; r += b) {
      rmsprop::transpose8(k, g + c * rows + r, rows, out + (r - r0) * stride + (c - c0), stride);
    }
  }
  for (size_t c = c0; c < c1; ++c) {
    for (size_t r = c < c_blocks ? r_blocks : r0; r < r1; ++r) {
      out[(r - r0) * stride + (c - c0)] = g[c * rows + r];
    }
  }
}

// One leaf whose g is the transpose of a row-major matrix (Leaf::g_transposed_columns): each tile of
// g is gathered into a buffer on the stack, then w's rows are updated against it with the same
// kernel as every other leaf. Copying g out first, element by element or tile by tile, cost more
// than the whole update (2048x2048 float32, MLP training step). Every run of a tile is a few lines
// long and a page away from the next, where the hardware prefetcher does not follow, so the next
// tile's runs are asked for while this one is updated: g's before it is gathered, and one row of w
// and the read states with each row updated (each of the two cut the step by a sixth or more).
template <typename Element>
void update_transposed(const Leaf& leaf, const Job& job, int max_threads) {
  const size_t columns = leaf.g_transposed_columns, rows = leaf.size / columns;
  const size_t tile_rows = (rows + kTileRows - 1) / kTileRows;
  const Element* g = static_cast<const Element*>(leaf.g);  // g[r, c] lies at g[c * rows + r]
  int threads = static_cast<int>(std::clamp<size_t>(leaf.size / kMinElementsPerThread, 1, max_threads));
  pool().run(threads, [&](int t) {
    const Kernel kernel = active_kernel.load(std::memory_order_relaxed);
    Element tile[kTileRows * kTileStride];
    // One row's pointers, moved along w's rows; no owners, so the rows copy no reference count.
    Leaf row;
    row.size = leaf.size, row.dtype = leaf.dtype, row.itemsize = leaf.itemsize;
    row.stream_w = leaf.stream_w, row.stream_s = leaf.stream_s;
    const size_t first = tile_rows * t / threads, last = tile_rows * (t + 1) / threads;
    for (size_t tr = first; tr < last; ++tr) {
      size_t r0 = tr * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (size_t c0 = 0; c0 < columns; c0 += kTileColumns) {
        size_t c1 = std::min(columns, c0 + kTileColumns), width = c1 - c0;
        // The next tile of this thread's rows: along them, else the first of the next rows.
        bool along = c1 < columns, next = along || tr + 1 < last;
        size_t nr0 = along ? r0 : r1, nr1 = along ? r1 : std::min(rows, r1 + kTileRows);
        size_t nc0 = along ? c1 : 0, nc1 = std::min(columns, nc0 + kTileColumns);
        for (size_t c = nc0; next && c < nc1; ++c) {
          prefetch_run(g + c * rows + nr0, (nr1 - nr0) * sizeof(Element));
        }
        gather_tile(kernel, g, rows, r0, r1, c0, c1, tile, kTileStride);
        for (size_t r = r0; r < r1; ++r) {
          if (size_t nr = nr0 + (r - r0); next && nr < nr1) {
            size_t at = (nr * columns + nc0) * leaf.itemsize, bytes = (nc1 - nc0) * leaf.itemsize;
            for (const void* p : {leaf.w, leaf.s[0], leaf.s[1]}) prefetch_run(offset(p, at), bytes);
          }
          size_t at = (r * columns + c0) * leaf.itemsize;
          row.w = offset(leaf.w, at);
          row.w_out = offset(leaf.w_out, at);
          for (size_t j = 0; j < kMaxStates; ++j) {
            row.s[j] = offset(leaf.s[j], at);
            row.s_out[j] = offset(leaf.s_out[j], at);
          }
          row.g = tile + (r - r0) * kTileStride;
          update_leaf_range(row, 0, width, job);
        }
      }
    }
    rmsprop::fence_streams(active_kernel.load(std::memory_order_relaxed));
  });
}

// Row-major copy of a strided array, for the rare broadcast or otherwise strided leaf.
void gather_row_major(const array& src, array& dst) {
  const char* in = static_cast<const char*>(src.data<void>());
  char* out = static_cast<char*>(dst.data<void>());
  size_t item = src.itemsize();
  int ndim = src.ndim();
  std::vector<int64_t> index(ndim, 0);
  for (size_t k = 0; k < src.size(); ++k) {
    int64_t offset = 0;
    for (int d = 0; d < ndim; ++d) {
      offset += index[d] * src.strides()[d];
    }
    std::memcpy(out + k * item, in + offset * static_cast<int64_t>(item), item);
    for (int d = ndim - 1; d >= 0 && ++index[d] == src.shape()[d]; --d) {
      index[d] = 0;
    }
  }
}

// ---------------------------------------------------------------- checks ---

using rmsprop::tree::LeafArrays;

bool supported(Dtype t) {
  return t == float32 || t == float16 || t == bfloat16;
}

// Thrown where a leaf's w, g and states disagree in shape or dtype, or have a dtype the kernel does not
// take; step_tree() then leaves the step to the Python walk, which names the leaf by its path.
struct LeafMismatch : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The two halves of check_leaf(), for read_leaves() to ask without throwing. A state the kernel
// neither loads nor stores is null, and not asked about.
bool dtypes_match(const LeafArrays& x) {
  bool match = supported(x.w->dtype()) && x.g->dtype() == x.w->dtype();
  for (const array* s : x.s) {
    match = match && (!s || s->dtype() == x.w->dtype());
  }
  return match;
}

bool shapes_match(const LeafArrays& x) {
  bool match = x.g->shape() == x.w->shape();
  for (const array* s : x.s) {
    match = match && (!s || s->shape() == x.w->shape());
  }
  return match;
}

// What every step needs of leaf i: w, g and the states of one supported dtype and one shape. Checked
// where the graph is built and again where it runs (sizes and dtypes) and where shapes are inferred
// (mx.compile(shapeless=True) replays a graph on new inputs without building it again): the
// kernel reads and writes w's size in every stream.
void check_leaf(size_t i, const LeafArrays& x) {
  if (!dtypes_match(x)) {
    throw LeafMismatch("cpu_kernel: leaf " + std::to_string(i) +
                       " needs w, g and its state arrays of one dtype among float32, float16, bfloat16");
  }
  if (!shapes_match(x)) {
    throw LeafMismatch("cpu_kernel: leaf " + std::to_string(i) + " has w, g and state arrays of different shapes");
  }
}

// ---------------------------------------------------------------- formula ---

// The rule's step in MLX ops, op for op as its stock class (generated/rules_formula.h): what the
// transforms of OptimizerStep (grad, jvp, vmap) differentiate and batch, and what leaves under a
// transform run. Precision::float32 computes in float32 and rounds once, as the kernel does in that
// mode. `s` holds every state of the rule, in its order; one the kernel does not read may be any array.
rmsprop::rules::Stepped formula(const RuleStep& rule, const array& w, const array& g, const std::vector<array>& s,
                                const array& lr, const std::vector<array>& step, Precision precision,
                                const Stream& st) {
  Dtype t = g.dtype();
  if (precision == Precision::float32 && t != float32) {
    std::vector<array> s32;
    for (const array& x : s) {
      s32.push_back(astype(x, float32, st));
    }
    auto out = formula(rule, astype(w, float32, st), astype(g, float32, st), s32, lr, step, Precision::stock, st);
    out.w = astype(out.w, t, st);
    for (auto& x : out.s) {
      if (x) x = astype(*x, t, st);
    }
    return out;
  }
  return rmsprop::rules::formula(rule.kernel, {w, g, s, lr, step, rule.slots, st});
}

// ---------------------------------------------------------------- primitive ---

// Where a node's arrays are in its input and output lists, for a node of n leaves of one kernel: the
// inputs are w..., g..., then each state the kernel reads (by the rule's order) for every leaf, the
// learning rate, then the rule's per-step inputs; the outputs are new w..., then each state it writes.
struct Layout {
  size_t n = 0, n_reads = 0, n_writes = 0, n_steps = 0;
  size_t read_states[kMaxStates] = {}, written_states[kMaxStates] = {};  // the rule's state index of each
  int read_slot[kMaxStates], write_slot[kMaxStates];                       // and back; -1 where not

  Layout(const RuleStep& rule, size_t leaves) : n(leaves), n_steps(rule.step_inputs()) {
    for (size_t j = 0; j < kMaxStates; ++j) {
      read_slot[j] = rule.reads(j) ? static_cast<int>(n_reads) : -1;
      write_slot[j] = rule.writes(j) ? static_cast<int>(n_writes) : -1;
      if (rule.reads(j)) read_states[n_reads++] = j;
      if (rule.writes(j)) written_states[n_writes++] = j;
    }
  }
  static Layout of_inputs(const RuleStep& rule, size_t inputs) {
    Layout l(rule, 0);
    l.n = (inputs - 1 - l.n_steps) / (2 + l.n_reads);
    return l;
  }

  size_t w(size_t i) const { return i; }
  size_t g(size_t i) const { return n + i; }
  size_t state_in(size_t r, size_t i) const { return (2 + r) * n + i; }  // r: the r-th state read
  size_t lr() const { return (2 + n_reads) * n; }
  size_t step(size_t k) const { return lr() + 1 + k; }
  size_t inputs() const { return lr() + 1 + n_steps; }
  size_t state_out(size_t r, size_t i) const { return (1 + r) * n + i; }  // r: the r-th state written
  size_t outputs() const { return (1 + n_writes) * n; }

  // Leaf i's arrays within a node's inputs (null where the kernel does not read a state).
  LeafArrays leaf(const std::vector<array>& in, size_t i) const {
    LeafArrays x{&in[w(i)], &in[g(i)], {}};
    for (size_t r = 0; r < n_reads; ++r) x.s[read_states[r]] = &in[state_in(r, i)];
    return x;
  }

  // Leaf i's inputs to its formula: w, g, the states read, lr, the step inputs.
  std::vector<array> leaf_inputs(const std::vector<array>& in, size_t i) const {
    std::vector<array> x{in[w(i)], in[g(i)]};
    for (size_t r = 0; r < n_reads; ++r) x.push_back(in[state_in(r, i)]);
    for (size_t k = 0; k <= n_steps; ++k) x.push_back(in[lr() + k]);
    return x;
  }
};

// The formula over one leaf's inputs as Layout::leaf_inputs() orders them, returning new w and the
// states written: what vjp and jvp take.
std::vector<array> leaf_formula(const RuleStep& rule, const Layout& l, const std::vector<array>& x, Precision precision,
                                const Stream& st) {
  std::vector<array> states(rule.states(), x[0]);  // an unread state is never looked at
  for (size_t r = 0; r < l.n_reads; ++r) states[l.read_states[r]] = x[2 + r];
  std::vector<array> step(x.begin() + 3 + l.n_reads, x.end());
  auto out = formula(rule, x[0], x[1], states, x[2 + l.n_reads], step, precision, st);
  std::vector<array> result{out.w};
  for (size_t r = 0; r < l.n_writes; ++r) result.push_back(*out.s[l.written_states[r]]);
  return result;
}

class OptimizerStep : public Primitive {
 public:
  OptimizerStep(Stream stream, RuleStep rule, Precision precision, int threads)
      : Primitive(stream), rule_(std::move(rule)), precision_(precision), threads_(threads) {}

  void eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) override {
    Layout l = Layout::of_inputs(rule_, inputs.size());
    if (l.inputs() != inputs.size() || l.outputs() != outputs.size()) {
      throw std::invalid_argument("cpu_kernel: a step node's inputs and outputs do not match its kernel");
    }
    for (size_t i = 0; i < l.n; ++i) {
      check_leaf(i, l.leaf(inputs, i));
      for (size_t k = 0; k <= l.n_writes; ++k) {
        const array& out = outputs[k * l.n + i];
        if (out.size() != inputs[i].size() || out.dtype() != inputs[i].dtype()) {
          throw std::invalid_argument("cpu_kernel: leaf " + std::to_string(i) + "'s outputs do not match its w");
        }
      }
    }
    for (size_t k = 0; k <= l.n_steps; ++k) {
      if (inputs[l.lr() + k].size() != 1 || inputs[l.lr() + k].dtype() != float32) {
        throw std::invalid_argument("cpu_kernel: the learning rate and the step inputs must be float32 scalars");
      }
    }
    auto& encoder = cpu::get_command_encoder(stream());
    std::vector<array> strided_sources, contiguous_copies;
    std::vector<Leaf> leaves;
    leaves.reserve(l.n);
    // Flags are read here, at eval time: an input's layout is only known once it has been evaluated.
    auto readable = [&](const array& x) -> array {
      if (x.flags().row_contiguous) {
        return x;
      }
      array copy(x.shape(), x.dtype(), nullptr, {});
      copy.set_data(allocator::malloc(copy.nbytes()));
      strided_sources.push_back(x);
      contiguous_copies.push_back(copy);
      return copy;
    };
    for (size_t i = 0; i < l.n; ++i) {
      // Before readable() below, which holds one more handle to its argument.
      bool fresh = !give_buffer(inputs[i], outputs[i], outputs.size());
      for (size_t r = 0; r < l.n_writes; ++r) {
        size_t j = l.written_states[r];
        array& out = outputs[l.state_out(r, i)];
        if (l.read_slot[j] >= 0) {
          fresh = !give_buffer(inputs[l.state_in(l.read_slot[j], i)], out, outputs.size()) && fresh;
        } else {
          out.set_data(allocator::malloc(out.nbytes()));
        }
      }
      bool transposed = is_transposed_matrix(inputs[l.g(i)]);
      array w = readable(inputs[i]);
      array g = transposed ? inputs[l.g(i)] : readable(inputs[l.g(i)]);
      Leaf leaf;
      leaf.w = w.data<void>(), leaf.g = g.data<void>(), leaf.w_out = outputs[i].data<void>();
      for (size_t r = 0; r < l.n_reads; ++r) {
        leaf.s[l.read_states[r]] = readable(inputs[l.state_in(r, i)]).data<void>();
      }
      for (size_t r = 0; r < l.n_writes; ++r) {
        array& out = outputs[l.state_out(r, i)];
        leaf.s_out[l.written_states[r]] = out.data<void>();
        leaf.s_owner[l.written_states[r]] = out.data_shared_ptr();
      }
      leaf.size = outputs[i].size(), leaf.dtype = outputs[i].dtype().val(), leaf.itemsize = outputs[i].itemsize();
      leaf.stream_w = leaf.stream_s = fresh;
      leaf.w_owner = outputs[i].data_shared_ptr(), leaf.g_owner = g.data_shared_ptr();
      leaf.g_transposed_columns = transposed ? static_cast<size_t>(g.shape(1)) : 0;
      leaves.push_back(std::move(leaf));
    }
    Job job{rule_.kernel, rule_.scalars(), precision_};
    // The task holds weak copies only; MLX keeps the buffers alive (inputs, outputs, temporaries) until it ran.
    std::vector<std::pair<array, array>> gathers;
    for (size_t k = 0; k < strided_sources.size(); ++k) {
      gathers.emplace_back(array::unsafe_weak_copy(strided_sources[k]), array::unsafe_weak_copy(contiguous_copies[k]));
    }
    std::vector<array> scalars;
    for (size_t k = 0; k <= l.n_steps; ++k) {
      scalars.push_back(array::unsafe_weak_copy(inputs[l.lr() + k]));
    }
    encoder.dispatch([leaves = std::move(leaves), job, scalars = std::move(scalars), gathers = std::move(gathers),
                      threads = threads_]() mutable {
      for (auto& [source, copy] : gathers) {
        gather_row_major(source, copy);
      }
      job.x.lr = *scalars[0].data<float>();
      for (size_t k = 1; k < scalars.size(); ++k) {
        job.x.step[k - 1] = *scalars[k].data<float>();
      }
      for (const Leaf& leaf : leaves) {
        size_t bytes = leaf.size * leaf.itemsize;
        the_huge_pages->use_for(leaf.w_out, bytes, leaf.w_owner);
        the_huge_pages->use_for(leaf.g, bytes, leaf.g_owner);
        for (size_t j = 0; j < kMaxStates; ++j) {
          if (leaf.s_out[j]) the_huge_pages->use_for(leaf.s_out[j], bytes, leaf.s_owner[j]);
        }
      }
      auto transposed = std::stable_partition(leaves.begin(), leaves.end(),
                                              [](const Leaf& leaf) { return leaf.g_transposed_columns == 0; });
      for (auto leaf = transposed; leaf != leaves.end(); ++leaf) {
        leaf->itemsize == 4 ? update_transposed<uint32_t>(*leaf, job, threads)
                            : update_transposed<uint16_t>(*leaf, job, threads);
      }
      leaves.erase(transposed, leaves.end());
      update_all(leaves, job, threads);
    });
    encoder.add_temporaries(std::move(strided_sources));
    encoder.add_temporaries(std::move(contiguous_copies));
  }

  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("OptimizerStep runs on the CPU only; use the metal_kernel or cuda_kernel variant on a GPU.");
  }

  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    Layout l = Layout::of_inputs(rule_, inputs.size());
    for (size_t i = 0; i < l.n; ++i) {
      check_leaf(i, l.leaf(inputs, i));
    }
    std::vector<Shape> shapes;
    for (size_t k = 0; k <= l.n_writes; ++k) {
      for (size_t i = 0; i < l.n; ++i) shapes.push_back(inputs[i].shape());
    }
    return shapes;
  }

  const char* name() const override {
    return "OptimizerStep";
  }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const OptimizerStep&>(other);
    return rule_ == o.rule_ && precision_ == o.precision_ && threads_ == o.threads_;
  }

  // The transforms run the formula in MLX ops, leaf by leaf (Layout has the order of the arrays).
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>&) override {
    Layout l = Layout::of_inputs(rule_, primals.size());
    std::vector<std::optional<array>> grads(primals.size());
    for (size_t i = 0; i < l.n; ++i) {
      std::vector<array> cot{cotangents[i]};
      for (size_t r = 0; r < l.n_writes; ++r) cot.push_back(cotangents[l.state_out(r, i)]);
      auto [outs, vjps] = mlx::core::vjp(leaf_function(l), l.leaf_inputs(primals, i), cot);
      grads[l.w(i)] = vjps[0];
      grads[l.g(i)] = vjps[1];
      for (size_t r = 0; r < l.n_reads; ++r) grads[l.state_in(r, i)] = vjps[2 + r];
      for (size_t k = 0; k <= l.n_steps; ++k) {  // lr and the step inputs are shared by every leaf
        auto& sum = grads[l.lr() + k];
        const array& mine = vjps[2 + l.n_reads + k];
        sum = sum ? add(*sum, mine, stream()) : mine;
      }
    }
    std::vector<array> result;
    for (int a : argnums) {
      result.push_back(*grads[a]);
    }
    return result;
  }

  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>& tangents,
                         const std::vector<int>& argnums) override {
    Layout l = Layout::of_inputs(rule_, primals.size());
    std::vector<array> full;
    for (const array& p : primals) {
      full.push_back(zeros_like(p, stream()));
    }
    for (size_t k = 0; k < argnums.size(); ++k) {
      full[argnums[k]] = tangents[k];
    }
    std::vector<array> out(l.outputs(), array(0.0f));
    for (size_t i = 0; i < l.n; ++i) {
      auto [outs, jvps] = mlx::core::jvp(leaf_function(l), l.leaf_inputs(primals, i), l.leaf_inputs(full, i));
      out[i] = jvps[0];
      for (size_t r = 0; r < l.n_writes; ++r) out[l.state_out(r, i)] = jvps[1 + r];
    }
    return out;
  }

  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    Layout l = Layout::of_inputs(rule_, inputs.size());
    // Batch axes to the front; an unbatched input broadcasts against a batched one as it is.
    std::vector<array> moved;
    for (size_t k = 0; k < inputs.size(); ++k) {
      moved.push_back(axes[k] < 0 || axes[k] == 0 ? inputs[k] : moveaxis(inputs[k], axes[k], 0, stream()));
    }
    std::vector<array> out(l.outputs(), array(0.0f));
    std::vector<int> out_axes(l.outputs(), -1);
    for (size_t i = 0; i < l.n; ++i) {
      std::vector<array> x = l.leaf_inputs(moved, i);
      bool batched = false;
      for (size_t k = 0; k < x.size(); ++k) {
        size_t at = k < 2 + l.n_reads ? (k < 2 ? (k == 0 ? l.w(i) : l.g(i)) : l.state_in(k - 2, i))
                                      : l.lr() + (k - 2 - l.n_reads);
        batched = batched || axes[at] >= 0;
        if (k >= 2 + l.n_reads && axes[at] >= 0) {  // a batch of scalars: one per row of every leaf
          Shape shape(1 + ndim_of_leaf(inputs, axes, i), 1);
          shape[0] = x[k].shape(0);
          x[k] = reshape(x[k], shape, stream());
        }
      }
      std::vector<array> results = leaf_formula(rule_, l, x, precision_, stream());
      for (size_t k = 0; k < results.size(); ++k) {
        size_t at = k == 0 ? i : l.state_out(k - 1, i);
        out[at] = results[k];
        out_axes[at] = batched ? 0 : -1;
      }
    }
    return {out, out_axes};
  }

 private:
  // Reuse the input's buffer for the output when nothing but this node holds it (MLX's donation);
  // returns whether it did.
  // MLX's own test, is_donatable(), asks for exactly one holder: right for a one-output primitive,
  // but every output of a multi-output node keeps its own copy of the input list, so here an
  // input that nobody else holds has one holder per output. Anything else that holds it (Python,
  // another node, a view of its buffer, a tracer's siblings) only adds to the counts.
  static bool give_buffer(const array& in, array& out, size_t holders_in_this_node) {
    const auto& data = in.data_shared_ptr();
    bool donatable = in.flags().row_contiguous && handles(in) == static_cast<long>(holders_in_this_node) &&
                     data.use_count() == 1 && mlx_compat::allocator_owns(*data) && in.data_size() == out.size();
    bool aligning = HugePages::worth_aligning(out.nbytes());
    bool misplaced = aligning && !HugePages::starts_on_huge_page(in.data<void>());
    if (donatable && !misplaced) {
      out.copy_shared_buffer(in);
      donated_buffers.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    if (aligning) {
      // Moved once: the next step donates this buffer, which starts on a huge page.
      HugePages::set_aligned_data(out);
    } else {
      out.set_data(allocator::malloc(out.nbytes()));
    }
    return false;
  }

  std::function<std::vector<array>(const std::vector<array>&)> leaf_function(const Layout& l) {
    return [rule = rule_, l, precision = precision_, s = stream()](const std::vector<array>& x) {
      return leaf_formula(rule, l, x, precision, s);
    };
  }

  // The unbatched rank of leaf i.
  static int ndim_of_leaf(const std::vector<array>& inputs, const std::vector<int>& axes, size_t i) {
    return static_cast<int>(inputs[i].ndim()) - (axes[i] >= 0 ? 1 : 0);
  }

  RuleStep rule_;
  Precision precision_;
  int threads_;
};

// One node per this many leaves. Each output of an MLX node holds a copy of the node's input list
// and of its sibling list, so a node of k leaves costs O(k^2) references: one node for a
// 16384-leaf tree would need tens of GB. Eight keeps that small and the nodes few.
constexpr size_t kLeavesPerNode = 8;

using Indices = std::vector<size_t>;  // of leaves

// The step's scalar inputs as float32 scalars: the learning rate and the rule's per-step inputs.
struct StepInputs {
  array lr;
  std::vector<array> values;

  bool traced() const {
    bool any = lr.is_tracer();
    for (const array& x : values) any = any || x.is_tracer();
    return any;
  }
  std::vector<array> all() const {
    std::vector<array> out{lr};
    out.insert(out.end(), values.begin(), values.end());
    return out;
  }
  // Their values, once evaluated, into a kernel's scalars.
  Scalars fill(Scalars x) const {
    x.lr = *lr.data<float>();
    for (size_t k = 0; k < values.size(); ++k) x.step[k] = *values[k].data<float>();
    return x;
  }
};

// One leaf's step: its new w and the states the kernel writes. Empty where the step wrote into memory
// the caller already has: a state over the old one, which the state dict holds, w into the spare,
// whose object step_tree() returns, or w over the old one, which the model holds; a state the kernel
// does not write stays empty too.
struct Stepped {
  std::optional<array> w, s[kMaxStates];
  nb::object w_spare;       // the spare's object, where w went into it
  bool w_in_place = false;  // w written over the old one, whose object step_tree() returns
  bool packed = false;      // updated at once, outside the graph (then a new w of its own is kept as a spare)
};

// Lazy: one OptimizerStep node per kLeavesPerNode of `which`, donating buffers at eval time.
void update_in_graph(const std::vector<LeafArrays>& leaves, const StepInputs& scalars, const Indices& which,
                     const std::shared_ptr<OptimizerStep>& step, const RuleStep& rule, std::vector<Stepped>& out) {
  for (size_t lo = 0; lo < which.size(); lo += kLeavesPerNode) {
    size_t hi = std::min(which.size(), lo + kLeavesPerNode);
    Layout l(rule, hi - lo);
    std::vector<array> inputs;
    inputs.reserve(l.inputs());
    for (size_t k = lo; k < hi; ++k) inputs.push_back(*leaves[which[k]].w);
    for (size_t k = lo; k < hi; ++k) inputs.push_back(*leaves[which[k]].g);
    for (size_t r = 0; r < l.n_reads; ++r) {
      for (size_t k = lo; k < hi; ++k) inputs.push_back(*leaves[which[k]].s[l.read_states[r]]);
    }
    for (const array& x : scalars.all()) inputs.push_back(x);
    std::vector<Shape> shapes;
    std::vector<Dtype> dtypes;
    for (size_t r = 0; r <= l.n_writes; ++r) {
      for (size_t k = lo; k < hi; ++k) {
        shapes.push_back(leaves[which[k]].w->shape());
        dtypes.push_back(leaves[which[k]].w->dtype());
      }
    }
    auto outputs = array::make_arrays(std::move(shapes), dtypes, step, std::move(inputs));
    for (size_t k = lo; k < hi; ++k) {
      out[which[k]].w = outputs[k - lo];
      for (size_t r = 0; r < l.n_writes; ++r) out[which[k]].s[l.written_states[r]] = outputs[l.state_out(r, k - lo)];
    }
  }
}

// Under a transform, which leaves run stock's own ops instead of an OptimizerStep node. A leaf whose
// states are placeholders (tracers with no primitive: inputs of the mx.compile'd function, as the
// optimizer state is in mlx-lm's and mlx-examples' training steps; for a rule that reads no state, w)
// keeps the node, so a compiled training step runs the kernel. Every other traced leaf (mx.grad, vjp
// or jvp through the step, a compiled function that closes over the state) runs stock's ops, so that
// the gradients through a step are the ones MLX computes for stock, bit for bit: the node's vjp sums
// the learning rate's cotangents in another order. MLX's headers name no test for "in a gradient
// transform" that its library exports (0.32's InTracing and InExportTracing are hidden).
bool is_placeholder(const array& x) {
  return x.is_tracer() && !x.has_primitive();
}

bool keeps_node(const LeafArrays& x) {
  bool any = false, all = true;
  for (const array* s : x.s) {
    if (s) any = true, all = all && is_placeholder(*s);
  }
  return any ? all : is_placeholder(*x.w);
}

// The rule's states of one leaf for its formula: every state in the rule's order (w where unread).
std::vector<array> formula_states(const RuleStep& rule, const LeafArrays& x) {
  std::vector<array> s;
  for (size_t j = 0; j < rule.states(); ++j) s.push_back(x.s[j] ? *x.s[j] : *x.w);
  return s;
}

void update_by_formula(const std::vector<LeafArrays>& leaves, const StepInputs& scalars, const Indices& which,
                       const RuleStep& rule, Precision precision, const Stream& st, std::vector<Stepped>& out) {
  for (size_t i : which) {
    const LeafArrays& x = leaves[i];
    auto stepped = formula(rule, *x.w, *x.g, formula_states(rule, x), scalars.lr, scalars.values, precision, st);
    out[i].w = std::move(stepped.w);
    for (size_t j = 0; j < kMaxStates; ++j) out[i].s[j] = std::move(stepped.s[j]);
  }
}

// ------------------------------------------------------------ small leaves ---

// Below this many elements (1 MiB of float32) leaves are updated at once, outside the graph. For
// small leaves a node and its output arrays cost MLX far more than the update (about 25 us per
// leaf on this machine against 0.1 us for 256 elements); for mid-size ones one pool job over
// every leaf beat nodes of eight leaves updated in place (256x64K: 10 ms against 12.5 on this
// machine) even though the new w must be other memory than the old one, which the caller holds
// while the step runs: a spare (in_place.h) or a fresh allocation.
constexpr size_t kEagerMaxElements = 1 << 18;
// Below this many bytes of new w per step, the small leaves are written with plain stores, not
// streamed past the cache: the next step reads them back, and a step this small leaves them in the
// cache. Measured here with the new w going into the spares: plain stores were as fast up to 16 MiB
// (1x1K 5.5 us against 5.9; 64x16K, 4 MiB, within the noise), and streaming ones 30% faster at
// 64 MiB (1024x16K 10.5 ms against 13.5-14.8).
constexpr size_t kStreamMinBytes = size_t(8) << 20;

// Each fresh output starts on a cache line, so that no two threads write one line.
constexpr size_t kLineBytes = 64;

// A new evaluated, row-major array of `like`'s shape and dtype in an allocation of its own: a
// caller that keeps one leaf keeps that leaf's bytes (and at most a line more) alive, nothing else.
array fresh_like(const array& like) {
  array out(like.shape(), like.dtype(), nullptr, {});
  size_t bytes = out.nbytes() + kLineBytes;
  array base(allocator::malloc(bytes), Shape{static_cast<ShapeElem>(bytes)}, uint8);
  uintptr_t start = reinterpret_cast<uintptr_t>(base.data<void>());
  share_row_major(out, base, round_up(start, kLineBytes) - start);
  out.set_status(array::Status::available);
  return out;
}

// What the step knows of the leaves beyond their arrays, which lets the small-leaf path write in
// place (in_place.h): each state's Python objects (held by the state dict and by the walk), the
// spare w's, and, where the caller puts the new w back where the old one was, the w's objects.
struct Reuse {
  const std::vector<nb::object>* s_objects = nullptr;  // kMaxStates lists, by the rule's state order
  // A list: per leaf, its new w of the step before last (None where it was not a small leaf). The
  // caller has usually dropped them by now, and then they take this step's new w instead of new memory.
  PyObject* spare = nullptr;
  // Each w's object (held by its container in the parameters and by the walk), where the caller is
  // Optimizer.update(model, ...), which hands the step the model itself and puts every new w back into
  // the container of the old one (Module.update): a w nothing else holds is then seen by no one after
  // the step but as the new w. Null for apply_gradients(), whose caller may keep the old tree.
  const std::vector<nb::object>* w_objects = nullptr;
};

// What a step needs of one leaf, read in one pass over its arrays (read_leaves()): on 16384 small
// leaves the arrays' descriptors (some 20 MB) fall out of the cache from one pass to the next, and
// every pass would wait on memory for each of them again.
struct LeafFacts {
  bool matches = false;  // w, g and the states of one shape and of one dtype the kernel takes
  bool traced = false;   // one of them is a tracer (mx.compile, a grad): every leaf goes in the graph
  bool evaluated = false;
  bool packed = false;  // evaluated, row-major and small: updated at once, unless a leaf is traced
  size_t size = 0, itemsize = 0;
  Dtype::Val dtype = Dtype::Val::float32;
  const void *w = nullptr, *g = nullptr, *s[kMaxStates] = {};
  // Clauses 1-3 of in_place.h hold for each state the kernel reads and writes, for the spare, for w.
  Candidate s_buffer[kMaxStates], spare_buffer, w_buffer;
  PyObject* spare = nullptr;
};

// How many leaves ahead read_leaves() asks for their Python objects (twice this) and descriptors
// (this), so that memory answers while the leaves between are read.
constexpr size_t kReadAhead = 8;

// Asks the cache for the part of an array's descriptor a step reads: the control block in front, the
// shape, and the fields from size to flags (within the first 320 bytes in MLX 0.32; elsewhere this
// only asks for less useful lines).
void prefetch_descriptor(const array& x) {
  const char* desc = static_cast<const char*>(reinterpret_cast<const std::shared_ptr<void>&>(x).get());
  for (int at = -16; at < 320; at += 64) {
    __builtin_prefetch(desc + at);
  }
}

// Asks the cache for the block that holds an array's buffer pointer and owner (allocator::Data), one
// more pointer away than the descriptor: reading it was half of read_leaves() on 16384x256 (perf).
void prefetch_data_block(const array& x) {
  const char* data = reinterpret_cast<const char*>(x.data_shared_ptr().get());
  __builtin_prefetch(data);
  __builtin_prefetch(data + sizeof(array::Data) - 1);  // it may straddle two lines
}

// Every leaf's LeafFacts, in one pass that asks the cache for the leaves ahead: for the Python objects
// first, then for the descriptors they hold, then for the blocks those point to.
std::vector<LeafFacts> read_leaves(const std::vector<LeafArrays>& leaves, const Reuse& reuse, const RuleStep& rule) {
  static PyTypeObject* array_type = reinterpret_cast<PyTypeObject*>(nb::type<array>().ptr());
  size_t n = leaves.size();
  std::vector<LeafFacts> facts(n);
  PyObject* spares = reuse.spare && PyList_CheckExact(reuse.spare) ? reuse.spare : nullptr;
  size_t n_spares = spares ? static_cast<size_t>(PyList_GET_SIZE(spares)) : 0;
  auto spare_at = [&](size_t i) -> const array* {
    PyObject* object = i < n_spares ? PyList_GET_ITEM(spares, i) : nullptr;
    return object && Py_TYPE(object) == array_type ? nb::inst_ptr<array>(object) : nullptr;
  };
  for (size_t i = 0; i < n; ++i) {
    if (i + 2 * kReadAhead < n) {
      const LeafArrays& later = leaves[i + 2 * kReadAhead];
      for (const array* x : {later.w, later.g, later.s[0], later.s[1]}) {
        if (x) __builtin_prefetch(x);  // the handle, inside the Python object
      }
      if (i + 2 * kReadAhead < n_spares) {
        __builtin_prefetch(PyList_GET_ITEM(spares, i + 2 * kReadAhead));
      }
    }
    if (i + kReadAhead < n) {
      const LeafArrays& next = leaves[i + kReadAhead];
      for (const array* x : {next.w, next.g, next.s[0], next.s[1], spare_at(i + kReadAhead)}) {
        if (x) {
          prefetch_descriptor(*x);
        }
      }
    }
    if (i + kReadAhead / 2 < n) {  // their descriptors have come by now: ask for what they point to
      const LeafArrays& soon = leaves[i + kReadAhead / 2];
      for (const array* x : {soon.w, soon.g, soon.s[0], soon.s[1], spare_at(i + kReadAhead / 2)}) {
        if (x) {
          prefetch_data_block(*x);
        }
      }
    }
    const LeafArrays& x = leaves[i];
    const array &w = *x.w, &g = *x.g;
    LeafFacts& f = facts[i];
    f.matches = dtypes_match(x) && shapes_match(x);  // else check_leaf() says which
    if (!f.matches) {
      continue;
    }
    f.size = w.size();
    f.traced = w.is_tracer() || g.is_tracer();
    f.evaluated = evaluated(w) && evaluated(g);
    bool row_major = w.flags().row_contiguous && g.flags().row_contiguous;
    for (const array* s : x.s) {
      if (s) {
        f.traced = f.traced || s->is_tracer();
        f.evaluated = f.evaluated && evaluated(*s);
        row_major = row_major && s->flags().row_contiguous;
      }
    }
    f.packed = !f.traced && f.evaluated && f.size < kEagerMaxElements && row_major;
    if (!f.packed) {
      continue;
    }
    f.itemsize = w.itemsize();
    f.dtype = w.dtype().val();
    f.w = w.data<void>();
    f.g = g.data<void>();
    for (size_t j = 0; j < kMaxStates; ++j) {
      if (!x.s[j]) {
        continue;
      }
      f.s[j] = x.s[j]->data<void>();
      // The state's dict and the walk hold each state's object.
      if (reuse.s_objects && rule.reads(j) && rule.writes(j) && unseen_alone(reuse.s_objects[j][i].ptr(), 2, *x.s[j])) {
        f.s_buffer[j] = Candidate::of(*x.s[j]);
      }
    }
    // Only its container in the model and the walk hold w.
    if (reuse.w_objects && unseen_alone((*reuse.w_objects)[i].ptr(), 2, w)) {
      f.w_buffer = Candidate::of(w);
    }
    // Only the spare list holds the spare.
    const array* spare = spare_at(i);
    if (spare && spare->shape() == w.shape() && spare->dtype() == w.dtype() &&
        unseen_alone(PyList_GET_ITEM(spares, i), 1, *spare)) {
      f.spare = PyList_GET_ITEM(spares, i);
      f.spare_buffer = Candidate::of(*spare);
    }
  }
  return facts;
}

std::atomic<uint64_t> states_in_place{0}, w_into_spares{0}, w_in_place{0};

// The small leaves' update, planned: where each new w and state goes. Nothing is written until run().
struct SmallLeavesPlan {
  std::vector<Leaf> updates;
  size_t n_in_place = 0, n_spares = 0, n_w_in_place = 0;

  void run(const StepInputs& scalars, Job job, int threads) {
    if (updates.empty()) {
      return;  // then lr may be a tracer, with no data
    }
    job.x = scalars.fill(job.x);
    states_in_place.fetch_add(n_in_place, std::memory_order_relaxed);
    w_into_spares.fetch_add(n_spares, std::memory_order_relaxed);
    w_in_place.fetch_add(n_w_in_place, std::memory_order_relaxed);
    update_all(updates, job, threads);
  }
};

// Plans the small leaves: the new w over the old one, else into the spare, and each new state over
// the old one where in_place.h's clause 4 allows, given clauses 1-3 from read_leaves(); elsewhere
// into fresh allocations, made here. Must be followed by run() with no Python code in between
// (clause 5).
SmallLeavesPlan plan_small_leaves(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts,
                                  const Indices& packed, const RuleStep& rule, std::vector<Stepped>& out) {
  // Every candidate of the step in one list, so that two states, or a state and a spare or a w, over
  // the same bytes are caught too. Per leaf: the states the rule reads and writes (only those can be
  // written in place), then its spare, then its w.
  size_t in_place_states[kMaxStates], n_in_place_states = 0, candidate_of[kMaxStates] = {};
  for (size_t j = 0; j < kMaxStates; ++j) {
    if (rule.reads(j) && rule.writes(j)) {
      candidate_of[j] = n_in_place_states;
      in_place_states[n_in_place_states++] = j;
    }
  }
  const size_t per_leaf = n_in_place_states + 2;
  std::vector<Candidate> candidates;
  candidates.reserve(per_leaf * packed.size());
  size_t new_w_bytes = 0;
  for (size_t i : packed) {
    for (size_t c = 0; c < n_in_place_states; ++c) candidates.push_back(facts[i].s_buffer[in_place_states[c]]);
    candidates.push_back(facts[i].spare_buffer);
    candidates.push_back(facts[i].w_buffer);
    new_w_bytes += facts[i].size * facts[i].itemsize;
  }
  keep_disjoint_and_unshared(candidates);
  SmallLeavesPlan plan;
  plan.updates.reserve(packed.size());
  bool stream = new_w_bytes >= kStreamMinBytes;
  for (size_t k = 0; k < packed.size(); ++k) {
    size_t i = packed[k];
    const LeafFacts& f = facts[i];
    const Candidate& w_in = candidates[per_leaf * k + n_in_place_states];
    const Candidate& w_over = candidates[per_leaf * k + n_in_place_states + 1];
    Stepped& result = out[i];
    result.packed = true;
    Leaf leaf;
    leaf.w = f.w, leaf.g = f.g, leaf.size = f.size, leaf.dtype = f.dtype, leaf.itemsize = f.itemsize;
    if (w_over) {
      result.w_in_place = true;
      leaf.w_out = const_cast<void*>(f.w);
      ++plan.n_w_in_place;
    } else if (w_in) {
      result.w_spare = nb::borrow(f.spare);
      leaf.w_out = reinterpret_cast<void*>(w_in.begin);
      ++plan.n_spares;
    } else {
      result.w = fresh_like(*leaves[i].w);
      leaf.w_out = result.w->data<void>();
    }
    bool all_in_place = true;
    for (size_t j = 0; j < kMaxStates; ++j) {
      leaf.s[j] = rule.reads(j) ? f.s[j] : nullptr;
      if (!rule.writes(j)) {
        continue;
      }
      if (rule.reads(j) && candidates[per_leaf * k + candidate_of[j]]) {
        leaf.s_out[j] = const_cast<void*>(f.s[j]);
        ++plan.n_in_place;
      } else {
        result.s[j] = fresh_like(*leaves[i].w);
        leaf.s_out[j] = result.s[j]->data<void>();
        all_in_place = false;
      }
    }
    // In place the lines are in the cache already: plain stores (loop.h; update_range() then stores
    // every state plainly too).
    leaf.stream_w = stream && !result.w_in_place, leaf.stream_s = stream && !all_in_place;
    plan.updates.push_back(std::move(leaf));
  }
  return plan;
}

// ------------------------------------------------------------------ a step ---

// A step over every leaf, planned from one read of the leaves: the small leaves' plan (run() writes
// them) and, already in `out`, the lazy results of the others.
struct Planned {
  std::vector<Stepped> out;
  SmallLeavesPlan small;
};

// The arrays that must be evaluated before the small leaves can be updated now (gradients usually
// are not yet), or none: then the step can be planned from these facts.
std::vector<array> pending_inputs(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts,
                                  const StepInputs& scalars) {
  std::vector<array> pending;
  bool traced = scalars.traced();
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!facts[i].matches) {
      check_leaf(i, leaves[i]);  // throws, naming what differs
    }
    traced = traced || facts[i].traced;
  }
  if (traced) {
    return pending;  // under a transform every leaf stays in the graph: a tracer has no data yet
  }
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!facts[i].evaluated && facts[i].size < kEagerMaxElements) {
      for (const array* x : {leaves[i].w, leaves[i].g, leaves[i].s[0], leaves[i].s[1]}) {
        if (x && !evaluated(*x)) {
          pending.push_back(*x);
        }
      }
    }
  }
  if (!pending.empty()) {
    for (const array& x : scalars.all()) {
      if (!evaluated(x)) pending.push_back(x);
    }
  }
  return pending;
}

Planned plan_step(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts,
                  const StepInputs& scalars, const RuleStep& rule, int threads, Precision precision) {
  size_t n = leaves.size();
  Planned p{std::vector<Stepped>(n), {}};
  bool traced = scalars.traced();
  for (const LeafFacts& f : facts) {
    traced = traced || f.traced;
  }
  bool any_small = false;
  for (size_t i = 0; i < n && !traced; ++i) {
    any_small = any_small || facts[i].packed;
  }
  if (any_small) {
    std::vector<array> lazy;
    for (const array& x : scalars.all()) {
      if (!evaluated(x)) lazy.push_back(x);
    }
    if (!lazy.empty()) {
      eval(lazy);  // scalars, usually available already; with the GIL held, so no Python code runs meanwhile
    }
  }
  Indices packed, in_graph;
  for (size_t i = 0; i < n; ++i) {
    (!traced && facts[i].packed ? packed : in_graph).push_back(i);
  }
  p.small = plan_small_leaves(leaves, facts, packed, rule, p.out);
  Indices by_formula;
  if (traced) {
    auto stays = std::stable_partition(in_graph.begin(), in_graph.end(), [&](size_t i) { return keeps_node(leaves[i]); });
    by_formula.assign(stays, in_graph.end());
    in_graph.erase(stays, in_graph.end());
  }
  Stream s = default_stream(Device::cpu);
  update_by_formula(leaves, scalars, by_formula, rule, precision, s, p.out);
  update_in_graph(leaves, scalars, in_graph, std::make_shared<OptimizerStep>(s, rule, precision, threads), rule, p.out);
  return p;
}

void check_threads(int threads) {
  if (threads < 1) {
    throw std::invalid_argument("cpu_kernel: threads must be >= 1");
  }
}

// Usually a float32 scalar already: then no op, and nothing to evaluate for the small leaves.
array as_float32_scalar(const array& x, const char* what) {
  if (x.size() != 1) {
    throw std::invalid_argument(std::string("cpu_kernel: the ") + what + " must be a scalar");
  }
  Stream s = default_stream(Device::cpu);
  return x.dtype() == float32 && x.ndim() == 0 ? x : reshape(astype(x, float32, s), {}, s);
}

StepInputs step_inputs(const RuleStep& rule, const array& lr, const std::vector<array>& values) {
  if (values.size() != rule.step_inputs()) {
    throw std::invalid_argument("cpu_kernel: kernel " + std::string(rule.info().name) + " takes " +
                                std::to_string(rule.step_inputs()) + " step inputs, not " +
                                std::to_string(values.size()));
  }
  StepInputs out{as_float32_scalar(lr, "learning rate"), {}};
  for (const array& x : values) out.values.push_back(as_float32_scalar(x, "step inputs"));
  return out;
}

// How often a step evaluates lazy inputs and reads the leaves again before it leaves the ones still
// lazy to the graph: a thread that keeps making them lazy cannot hold a step in a loop.
constexpr int kEvalRounds = 2;

// One step over every leaf of one generated kernel: returns (new w list, per state of the rule its
// new arrays, empty for a state the kernel does not write). `states` holds one list per state of the
// rule; a state the kernel does not use may have an empty list.
std::pair<std::vector<array>, std::vector<std::vector<array>>> optimizer_update(
    int kernel, const std::vector<double>& slots, const std::vector<array>& w, const std::vector<array>& g,
    const std::vector<std::vector<array>>& states, const array& lr, const std::vector<array>& values, int threads,
    const std::string& precision_name) {
  RuleStep rule = RuleStep::of(kernel, slots);
  Precision precision = parse_precision(precision_name);
  check_threads(threads);
  size_t n = w.size();
  if (states.size() != rule.states()) {
    throw std::invalid_argument("cpu_kernel: kernel " + std::string(rule.info().name) + " takes " +
                                std::to_string(rule.states()) + " state lists, not " + std::to_string(states.size()));
  }
  bool sizes = g.size() == n;
  for (size_t j = 0; j < rule.states(); ++j) {
    sizes = sizes && (!rule.uses(j) || states[j].size() == n);
  }
  if (!sizes) {
    throw std::invalid_argument("cpu_kernel: w, g and each state the kernel uses need one entry per leaf each");
  }
  // The lists hold their own handles, so nothing here can be changed under the step, and with no
  // Reuse nothing is written in place.
  std::vector<LeafArrays> leaves(n);
  for (size_t i = 0; i < n; ++i) {
    leaves[i].w = &w[i], leaves[i].g = &g[i];
    for (size_t j = 0; j < rule.states(); ++j) leaves[i].s[j] = rule.uses(j) ? &states[j][i] : nullptr;
  }
  StepInputs scalars = step_inputs(rule, lr, values);
  std::vector<LeafFacts> facts;
  for (int round = 0;; ++round) {
    facts = read_leaves(leaves, Reuse{}, rule);
    std::vector<array> pending = pending_inputs(leaves, facts, scalars);
    if (pending.empty() || round == kEvalRounds) {
      break;
    }
    nb::gil_scoped_release no_gil;
    eval(pending);
  }
  Planned p = plan_step(leaves, facts, scalars, rule, threads, precision);
  p.small.run(scalars, {rule.kernel, rule.scalars(), precision}, threads);
  std::pair<std::vector<array>, std::vector<std::vector<array>>> out;
  out.first.reserve(n);
  out.second.resize(rule.states());
  for (Stepped& leaf : p.out) {  // with no Reuse, every leaf has a new w and new written states
    out.first.push_back(std::move(*leaf.w));
    for (size_t j = 0; j < rule.states(); ++j) {
      if (rule.writes(j)) out.second[j].push_back(std::move(*leaf.s[j]));
    }
  }
  return out;
}

// ------------------------------------------------------------ whole step ---

// step + 1, computed now where step has its value: a lazy scalar in the state would make the
// caller's mx.eval walk every array it is given (about 2 us per leaf) instead of returning at once.
array advanced(const array& step) {
  if (step.is_tracer() || !step.is_available() || step.dtype() != uint64 || step.size() != 1) {
    return add(step, array(1, step.dtype()), default_stream(Device::cpu));
  }
  return array(step.item<uint64_t>() + 1, uint64);
}

// Whether two leaves share one state dict (opt.state["b"] = opt.state["a"]): stock then updates
// them one after the other, b reading a's new state, which a step that reads every state first cannot
// do. A dict held by its parent and the walk alone is not shared, so only the others are looked up.
bool shares_a_state(const rmsprop::tree::Leaves& leaves) {
  std::unordered_set<PyObject*> seen;
  for (const nb::object& state : leaves.states) {
    if (Py_REFCNT(state.ptr()) > 2 && !seen.insert(state.ptr()).second) {
      return true;
    }
  }
  return false;
}

// One whole optimizer step in one call: the trees walked in C++ (tree_walk.h), every leaf updated,
// the new states stored in the state dicts, the step counter advanced, and (the new parameter tree,
// the new spare list) returned. None, with nothing changed, where the trees are not plain, a leaf's
// arrays disagree or two leaves share a state: the Python walk then runs, which names any problem and
// computes as stock does. `spare` holds the small leaves' new w of the step before last (None for the
// other leaves), which this step writes into where nothing else can see them; the list returned holds
// this step's, for the step after next. With `rebinds` (Optimizer.update(model, ...) only: `parameters`
// is the model, and Module.update puts each new w where the old one was) a small leaf's new w goes
// over its old one where nothing but the model holds it (Reuse::w_objects); that leaf gets no spare.
//
// A TreeStep holds what stays fixed from step to step (the kernel and its slot values, the rule's
// state names as interned keys, the threads and the precision), converted and checked once rather
// than on every call.
//
// Transactional: every check, allocation and Python object is made before the first write, so an
// error leaves the parameters and the state as they were. Between the last walk and the writes the
// GIL is held and the collector paused (in_place.h, clause 5).
class TreeStep {
 public:
  // `state_names`: the rule's states, in its order.
  TreeStep(int kernel, std::vector<double> slots, const std::vector<std::string>& state_names, int threads,
           const std::string& precision)
      : rule_(RuleStep::of(kernel, std::move(slots))),
        precision_(parse_precision(precision)),
        threads_(threads),
        walker_(used_states(rule_, state_names)) {
    check_threads(threads);
  }

  nb::object operator()(nb::handle gradients, nb::handle parameters, nb::dict state, const array& lr,
                        const std::vector<array>& values, nb::list spare, bool rebinds) const;

 private:
  // The rule's state names, with an empty one for each state the kernel neither reads nor writes.
  static std::vector<std::string> used_states(const RuleStep& rule, const std::vector<std::string>& names) {
    if (names.size() != rule.states()) {
      throw std::invalid_argument("cpu_kernel: kernel " + std::string(rule.info().name) + " has " +
                                  std::to_string(rule.states()) + " states, not " + std::to_string(names.size()));
    }
    std::vector<std::string> used(rule.states());
    for (size_t j = 0; j < rule.states(); ++j) {
      if (rule.uses(j)) used[j] = names[j];
    }
    return used;
  }

  RuleStep rule_;
  Precision precision_;
  int threads_;
  rmsprop::tree::Walker walker_;
};

nb::object TreeStep::operator()(nb::handle gradients, nb::handle parameters, nb::dict state, const array& lr,
                                const std::vector<array>& values, nb::list spare, bool rebinds) const {
  const RuleStep& rule = rule_;
  const rmsprop::tree::Walker& walker = walker_;
  if (!PyDict_Check(gradients.ptr())) {
    return nb::none();
  }
  GcPaused no_collection;
  StepInputs scalars = step_inputs(rule, lr, values);
  rmsprop::tree::Leaves leaves;
  std::vector<LeafFacts> facts;
  for (int round = 0;; ++round) {
    leaves = {};
    leaves.reserve(PyList_GET_SIZE(spare.ptr()));  // as many as the last step had, usually
    if (!walker.walk(gradients.ptr(), parameters.ptr(), state.ptr(), leaves) || shares_a_state(leaves)) {
      return nb::none();
    }
    Reuse reuse{leaves.s_objects, spare.ptr()};
    if (rebinds && leaves.assigned_back) {
      reuse.w_objects = &leaves.w_objects;
    }
    facts = read_leaves(leaves.arrays, reuse, rule);
    std::vector<array> pending;
    try {
      pending = pending_inputs(leaves.arrays, facts, scalars);
    } catch (const LeafMismatch&) {
      return nb::none();
    }
    if (pending.empty() || round == kEvalRounds) {
      break;
    }
    // Another thread may change any tree while the GIL is released: walk and check again after.
    no_collection.let_run([&] {
      nb::gil_scoped_release no_gil;
      eval(pending);
    });
  }
  PyObject* step = PyDict_GetItemString(state.ptr(), "step");
  if (!step || !walker.is_array(step)) {
    return nb::none();
  }
  array next_step = advanced(*nb::inst_ptr<array>(step));
  Planned p = plan_step(leaves.arrays, facts, scalars, rule, threads_, precision_);
  size_t n = p.out.size();
  // Every Python object the step hands out, made before anything is written.
  std::vector<nb::object> new_leaves, new_states[kMaxStates];
  new_leaves.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    Stepped& leaf = p.out[i];
    if (leaf.w) {
      new_leaves.push_back(nb::cast(std::move(*leaf.w)));
    } else {
      new_leaves.push_back(leaf.w_in_place ? leaves.w_objects[i] : std::move(leaf.w_spare));
    }
  }
  for (size_t j = 0; j < kMaxStates; ++j) {
    if (!rule.writes(j)) continue;
    new_states[j].resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (p.out[i].s[j]) {  // else updated in place: the state holds it already
        new_states[j][i] = nb::cast(std::move(*p.out[i].s[j]));
      }
    }
  }
  nb::object new_parameters = walker.rebuild(gradients.ptr(), new_leaves);
  // Only small leaves' w's of their own are kept: holding a big leaf's would stop the next step donating
  // it, and holding the model's would stop the next step writing over it.
  nb::object next_spare = nb::steal(PyList_New(static_cast<Py_ssize_t>(n)));
  if (!next_spare.is_valid()) {
    throw nb::python_error();
  }
  for (size_t i = 0; i < n; ++i) {
    bool own_w = p.out[i].packed && !p.out[i].w_in_place;
    nb::object kept = own_w ? new_leaves[i] : nb::none();
    PyList_SET_ITEM(next_spare.ptr(), static_cast<Py_ssize_t>(i), kept.release().ptr());
  }
  nb::object new_step = nb::cast(std::move(next_step));
  nb::object result = nb::make_tuple(new_parameters, next_spare);
  // The writes. Replacing a dict's existing entry allocates nothing, and the walk still holds every
  // old state, so no object is freed (and no finalizer runs) until the step has returned.
  p.small.run(scalars, {rule.kernel, rule.scalars(), precision_}, threads_);
  for (size_t j = 0; j < kMaxStates; ++j) {
    for (size_t i = 0; i < new_states[j].size(); ++i) {
      if (new_states[j][i].is_valid()) {
        walker.set_state(leaves.states[i], j, std::move(new_states[j][i]));
      }
    }
  }
  state["step"] = new_step;
  return result;
}

// ------------------------------------------------------------- at import ---

// mx.array crosses into this module only if both were built with one nanobind ABI and the same
// NB_DOMAIN ("mlx"); otherwise the first call would fail with a baffling type error.
void check_nanobind_abi() {
  nb::module_::import_("mlx.core");
  if (!nb::type<array>().is_valid()) {
    std::string why =
        "rmsprop_impls.kernels._cpu_ext: mlx.core's arrays are not visible to this extension (built with nanobind " +
        std::to_string(NB_VERSION_MAJOR) + "." + std::to_string(NB_VERSION_MINOR) +
        " in NB_DOMAIN mlx): the nanobind it was built with has another ABI than mlx's; rebuild it with the "
        "nanobind version mlx was built with";
    throw nb::import_error(why.c_str());  // std::runtime_error copies the message
  }
}

// give_buffer() donates an input when its handle count is exactly what this node's own input
// lists hold, which rests on a type pun over mlx::core::array and on how many copies of its input
// list MLX keeps. Checked once here, where a wrong answer is cheap: an input someone still holds
// must come back unchanged and undonated.
void check_donation_invariant() {
  Shape shape{static_cast<ShapeElem>(kEagerMaxElements)};
  array w = full(shape, 1.0f, Device::cpu), g = full(shape, 1.0f, Device::cpu), v = full(shape, 1.0f, Device::cpu);
  eval({w, g, v});
  uint64_t before = donated_buffers.load();
  const auto& rmsprop = rmsprop::rules::kInfo[0];  // the first kernel is RMSprop's: v only
  std::vector<double> slots(rmsprop.slot_values, rmsprop.slot_values + rmsprop.slots);
  auto [nw, states] = optimizer_update(0, slots, {w}, {g}, {{v}}, array(0.5f), {}, 1, "stock");
  array nv = states.at(0).at(0);
  eval({nw[0], nv});
  bool unchanged = w.data<float>()[0] == 1.0f && v.data<float>()[0] == 1.0f && nw[0].data<float>()[0] != 1.0f;
  if (donated_buffers.load() != before || nw[0].data<void>() == w.data<void>() || !unchanged) {
    donated_buffers.store(before);
    throw nb::import_error(
        "rmsprop_impls.kernels._cpu_ext: a held input was donated (overwritten) in the import-time check; this MLX "
        "keeps its graph's inputs differently from the one the donation rule was written for");
  }
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "A fused, multi-tensor, threaded optimizer step for MLX's CPU back-end, for every generated kernel.";
  check_nanobind_abi();
  check_donation_invariant();
  m.attr("MLX_VERSION") = RMSPROP_MLX_VERSION;
  m.def("optimizer_update", &optimizer_update, "kernel"_a, "slots"_a, "w"_a, "g"_a, "states"_a, "lr"_a,
        "step_inputs"_a, "threads"_a, "precision"_a = "stock",
        "One step of generated kernel `kernel` over every leaf: returns (new w list, per state of the rule its new "
        "arrays, empty for one the kernel does not write). precision=\"stock\" rounds as the stock class does in "
        "every dtype; \"float32\" computes in float32 and rounds once.");
  nb::class_<TreeStep>(m, "TreeStep",
                       "One whole optimizer step of generated kernel `kernel`, its fixed arguments converted once.")
      .def(nb::init<int, std::vector<double>, const std::vector<std::string>&, int, const std::string&>(), "kernel"_a,
           "slots"_a, "state_names"_a, "threads"_a, "precision"_a = "stock")
      .def("__call__", &TreeStep::operator(), "gradients"_a, "parameters"_a, "state"_a, "lr"_a, "step_inputs"_a,
           "spare"_a, "rebinds"_a = false,
           "Walks the trees, updates every leaf, stores each new state in the state dicts and advances "
           "state['step']; returns (the new parameter tree, the new spare list), or None (nothing changed) where "
           "the trees are not plain dicts, lists and tuples of arrays with the stock state. spare: a list of the "
           "step before last's new packed w's, written into where nothing else holds them. rebinds: parameters is "
           "the model, which Module.update gives each new w in the old one's place (Optimizer.update only): a packed "
           "w nothing else holds is written over.");
  m.def("kernels_table", [] {
        std::vector<std::pair<std::string, std::string>> table;
        for (const auto& k : rmsprop::rules::kInfo) table.emplace_back(k.name, k.digest);
        return table;
      },
      "Each generated kernel's (name, digest of its trace), by index: Python checks them against the rules.");
  m.def("hardware_threads", [] { return std::max(1u, std::thread::hardware_concurrency()); },
        "The number of hardware threads, the default thread count.");
  m.def("donated_buffers", [] { return donated_buffers.load(); },
        "How many outputs so far reused an input's buffer instead of allocating one.");
  m.def("states_updated_in_place", [] { return states_in_place.load(); },
        "How many leaves' state arrays so far were updated in place, as nothing but the optimizer state could see "
        "them.");
  m.def("w_into_spares", [] { return w_into_spares.load(); },
        "How many leaves' new w so far went into a spare: a w of the step before last that nothing else held.");
  m.def("w_updated_in_place", [] { return w_in_place.load(); },
        "How many leaves' new w so far went over the old one: Optimizer.update(model, ...) with nothing but the "
        "model holding it.");
  m.def("huge_page_moves", [] { return the_huge_pages->moves(); },
        "How many long-lived buffers so far were moved onto 2 MiB pages.");
  m.def("huge_page_tries", [] { return the_huge_pages->tries(); },
        "How many long-lived buffers so far were asked to move onto 2 MiB pages (the kernel may refuse a move).");
  m.attr("EAGER_MAX_ELEMENTS") = kEagerMaxElements;
  m.attr("STREAM_MIN_BYTES") = kStreamMinBytes;
  m.def("uses_avx2", [] { return active_kernel.load() == Kernel::avx2; }, "Whether steps run the AVX2 kernel.");
  m.def("kernel", [] { return rmsprop::kernel_name(active_kernel.load()); }, "The kernel steps run now.");
  m.def("kernels", [] {
        std::vector<std::string> names;
        for (Kernel k : rmsprop::available_kernels()) names.push_back(rmsprop::kernel_name(k));
        return names;
      },
      "The kernels this build has and this CPU runs, the default first.");
  m.def("set_kernel", [](const std::string& name) {
        std::string here;
        for (Kernel k : rmsprop::available_kernels()) {
          if (name == rmsprop::kernel_name(k)) {
            active_kernel.store(k);
            return;
          }
          here += std::string(here.empty() ? "" : ", ") + rmsprop::kernel_name(k);
        }
        throw std::invalid_argument("set_kernel: no kernel '" + name + "' here; this build and CPU run " + here);
      },
      "name"_a, "Runs every later step on this kernel (for tests: each one gives the same bits).");
}
