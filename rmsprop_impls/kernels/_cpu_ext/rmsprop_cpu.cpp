// One fused, multi-tensor, threaded RMSprop step for MLX's CPU back-end.
//
// Leaves of kEagerMaxElements or more: an RMSpropStep node takes the w, g and v of up to
// kLeavesPerNode leaves plus the learning rate and yields their new w and v, reusing input
// buffers nobody else holds (donation). Smaller leaves are updated at once, outside the graph (as
// graph nodes they would cost MLX more than their work), each new w and v in memory of its own,
// except where in_place.h allows v to be overwritten and the new w to go into the w of the step
// before last. After the first step, step_tree()
// walks the trees here too. Either way the elements are split evenly over a persistent thread pool
// (MLX's CPU back-end runs each task on one thread) and each thread streams its share once, with
// the vector kernel simd/simd.h picks for this CPU (AVX2, NEON, or the scalar loop) and software
// prefetch, rounding as stock does (precision "stock") or once from float32 (precision "float32").

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
#include "simd/simd.h"
#include "tree_walk.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx::core;
using rmsprop::bf16;
using rmsprop::f16;
using rmsprop::Hyper;
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

// ------------------------------------------------------------------ math ---

// The learning rate is filled in once its array has been evaluated.
Hyper hyper(double alpha, double eps) {
  return {0.0f, static_cast<float>(alpha), static_cast<float>(1.0 - alpha), static_cast<float>(eps)};
}

// The kernel every step runs: picked once, the fastest this CPU has; tests switch it.
std::atomic<Kernel> active_kernel{rmsprop::available_kernels().front()};

// ------------------------------------------------------------------ leaves ---

struct Leaf {
  const void* w;
  const void* g;
  const void* v;
  void* w_out;
  void* v_out;
  size_t size;
  Dtype::Val dtype;
  size_t itemsize;
  // Whether the kernel writes w_out and v_out past the cache (loop.h): not memory it reads in this
  // step (a fresh allocation, a spare, not v in place) and a step of kStreamMinBytes or more.
  bool stream_w, stream_v;
  // The allocations behind w_out, g and v_out, which the huge-page move keys on. Weak: a handle
  // here must not count as a holder when the next step asks whether it may donate a buffer.
  std::weak_ptr<array::Data> w_owner, g_owner, v_owner;
  // Where g is the transpose of a row-major matrix (a Linear's weight gradient): w's columns, and g
  // is read tile by tile (update_transposed()); 0 where g is row-major like w and v.
  size_t g_transposed_columns = 0;
};

// The two numeric contracts (docs/kernels/cpu.md): stock's, which rounds lr, the constants and
// every intermediate to the storage dtype as stock RMSprop does, and one rounding from float32.
enum class Precision { stock, float32 };

Precision parse_precision(const std::string& name) {
  if (name == "stock") return Precision::stock;
  if (name == "float32") return Precision::float32;
  throw std::invalid_argument("rmsprop_update: precision must be \"stock\" or \"float32\", not \"" + name + "\"");
}

template <typename T, bool kStreamW, bool kStreamV>
void update_range(const Leaf& leaf, size_t lo, size_t hi, const Hyper& h, Precision precision) {
  auto at = [&](const void* p) { return static_cast<const T*>(p) + lo; };
  T* w_out = static_cast<T*>(leaf.w_out) + lo;
  T* v_out = static_cast<T*>(leaf.v_out) + lo;
  Kernel k = active_kernel.load(std::memory_order_relaxed);
  if (precision == Precision::stock) {
    rmsprop::update<T, true, kStreamW, kStreamV>(k, at(leaf.w), at(leaf.g), at(leaf.v), w_out, v_out, hi - lo,
                                                 rmsprop::rounded_to<T>(h));
  } else {
    rmsprop::update<T, false, kStreamW, kStreamV>(k, at(leaf.w), at(leaf.g), at(leaf.v), w_out, v_out, hi - lo, h);
  }
}

template <typename T>
void update_range(const Leaf& leaf, size_t lo, size_t hi, const Hyper& h, Precision precision) {
  if (!leaf.stream_w) {
    update_range<T, false, false>(leaf, lo, hi, h, precision);
  } else if (leaf.stream_v) {
    update_range<T, true, true>(leaf, lo, hi, h, precision);
  } else {
    update_range<T, true, false>(leaf, lo, hi, h, precision);
  }
}

void update_leaf_range(const Leaf& leaf, size_t lo, size_t hi, const Hyper& h, Precision precision) {
  switch (leaf.dtype) {
    case Dtype::Val::float32:
      // float32 has the bits for both contracts to be the same: one instantiation.
      return update_range<float>(leaf, lo, hi, h, Precision::float32);
    case Dtype::Val::float16:
      return update_range<f16>(leaf, lo, hi, h, precision);
    default:
      return update_range<bf16>(leaf, lo, hi, h, precision);
  }
}

// Below this many elements a step is faster on one thread than waking others.
constexpr size_t kMinElementsPerThread = 1 << 15;
// Thread shares start on 64-element boundaries so no two threads write one cache line.
constexpr size_t kShareAlign = 64;

// Asks the cache for the first lines of a leaf's inputs while the leaf before it is updated: the
// kernel's own prefetch runs ahead within a leaf, and a small leaf ends before it starts.
void prefetch_start(const Leaf& leaf) {
  size_t bytes = std::min<size_t>(leaf.size * leaf.itemsize, 256);
  for (const void* p : {leaf.w, leaf.g, leaf.v}) {
    for (size_t at = 0; at < bytes; at += 64) {
      __builtin_prefetch(static_cast<const char*>(p) + at);
    }
  }
}

void update_all(const std::vector<Leaf>& leaves, const Hyper& h, Precision precision, int max_threads) {
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
        update_leaf_range(leaves[i], a, b, h, precision);
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

// Tiles of a transposed gradient: this many rows of w by this many columns (16 KiB of float32),
// so that g's lines and w's and v's all stay in L1 while a tile is updated.
constexpr size_t kTileRows = 32, kTileColumns = 128;

// One leaf whose g is the transpose of a row-major matrix (Leaf::g_transposed_columns): each tile of
// g is gathered into a buffer on the stack, then w's rows are updated against it with the same
// kernel as every other leaf. Copying g out first, element by element or tile by tile, cost more
// than the whole update (2048x2048 float32, MLP training step).
template <typename Element>
void update_transposed(const Leaf& leaf, const Hyper& h, Precision precision, int max_threads) {
  const size_t columns = leaf.g_transposed_columns, rows = leaf.size / columns;
  const size_t tile_rows = (rows + kTileRows - 1) / kTileRows;
  const Element* g = static_cast<const Element*>(leaf.g);  // g[r, c] lies at g[c * rows + r]
  int threads = static_cast<int>(std::clamp<size_t>(leaf.size / kMinElementsPerThread, 1, max_threads));
  pool().run(threads, [&](int t) {
    Element tile[kTileRows * kTileColumns];
    // One row's pointers, moved along w's rows; no owners, so the rows copy no reference count.
    Leaf row{leaf.w, leaf.g, leaf.v, leaf.w_out, leaf.v_out, leaf.size, leaf.dtype, leaf.itemsize,
             leaf.stream_w, leaf.stream_v};
    for (size_t tr = tile_rows * t / threads; tr < tile_rows * (t + 1) / threads; ++tr) {
      size_t r0 = tr * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (size_t c0 = 0; c0 < columns; c0 += kTileColumns) {
        size_t c1 = std::min(columns, c0 + kTileColumns), width = c1 - c0;
        for (size_t c = c0; c < c1; ++c) {
          for (size_t r = r0; r < r1; ++r) {
            tile[(r - r0) * kTileColumns + (c - c0)] = g[c * rows + r];
          }
        }
        for (size_t r = r0; r < r1; ++r) {
          size_t at = (r * columns + c0) * leaf.itemsize;
          row.w = static_cast<const char*>(leaf.w) + at;
          row.v = static_cast<const char*>(leaf.v) + at;
          row.w_out = static_cast<char*>(leaf.w_out) + at;
          row.v_out = static_cast<char*>(leaf.v_out) + at;
          row.g = tile + (r - r0) * kTileColumns;
          update_leaf_range(row, 0, width, h, precision);
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

bool supported(Dtype t) {
  return t == float32 || t == float16 || t == bfloat16;
}

// Thrown where a leaf's w, g and v disagree in shape or dtype, or have a dtype the kernel does not take;
// step_tree() then leaves the step to the Python walk, which names the leaf by its path.
struct LeafMismatch : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The two halves of check_leaf(), for read_leaves() to ask without throwing.
bool dtypes_match(const array& w, const array& g, const array& v) {
  return supported(w.dtype()) && g.dtype() == w.dtype() && v.dtype() == w.dtype();
}

bool shapes_match(const array& w, const array& g, const array& v) {
  return g.shape() == w.shape() && v.shape() == w.shape();
}

// What every step needs of leaf i: w, g and v of one supported dtype and one shape. Checked where
// the graph is built and again where it runs (sizes and dtypes) and where shapes are inferred
// (mx.compile(shapeless=True) replays a graph on new inputs without building it again): the
// kernel reads and writes w's size in all five streams.
void check_leaf(size_t i, const array& w, const array& g, const array& v) {
  if (!dtypes_match(w, g, v)) {
    throw LeafMismatch("rmsprop_update: leaf " + std::to_string(i) +
                       " needs w, g and v of one dtype among float32, float16, bfloat16");
  }
  if (!shapes_match(w, g, v)) {
    throw LeafMismatch("rmsprop_update: leaf " + std::to_string(i) + " has w, g and v of different shapes");
  }
}

// ---------------------------------------------------------------- formula ---

// Stock RMSprop's step in MLX ops, op for op (rmsprop_impls/formula.py): what the transforms of
// RMSpropStep (grad, jvp, vmap) differentiate and batch. Precision::float32 computes in float32
// and rounds once, as the kernel does in that mode.
std::pair<array, array> formula(const array& w, const array& g, const array& v, const array& lr, double alpha,
                                double eps, Precision precision, const Stream& s) {
  Dtype t = g.dtype();
  if (precision == Precision::float32 && t != float32) {
    auto [nw, nv] = formula(astype(w, float32, s), astype(g, float32, s), astype(v, float32, s), lr, alpha, eps,
                            Precision::stock, s);
    return {astype(nw, t, s), astype(nv, t, s)};
  }
  // Python floats meet an array as weakly typed scalars: float32, then the array's dtype.
  auto scalar = [&](double x) { return array(static_cast<float>(x), t); };
  array nv = add(multiply(scalar(alpha), v, s), multiply(scalar(1.0 - alpha), square(g, s), s), s);
  array step = divide(multiply(astype(lr, t, s), g, s), add(sqrt(nv, s), scalar(eps), s), s);
  return {subtract(w, step, s), nv};
}

// ---------------------------------------------------------------- primitive ---

class RMSpropStep : public Primitive {
 public:
  RMSpropStep(Stream stream, double alpha, double eps, Precision precision, int threads)
      : Primitive(stream), alpha_(alpha), eps_(eps), precision_(precision), threads_(threads) {}

  void eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) override {
    size_t n = outputs.size() / 2;
    for (size_t i = 0; i < n; ++i) {
      const array &w = inputs[i], &g = inputs[n + i], &v = inputs[2 * n + i];
      check_leaf(i, w, g, v);
      for (const array* out : {&outputs[i], &outputs[n + i]}) {
        if (out->size() != w.size() || out->dtype() != w.dtype()) {
          throw std::invalid_argument("rmsprop_update: leaf " + std::to_string(i) + "'s outputs do not match its w");
        }
      }
    }
    if (inputs[3 * n].size() != 1 || inputs[3 * n].dtype() != float32) {
      throw std::invalid_argument("rmsprop_update: the learning rate must be a float32 scalar");
    }
    auto& encoder = cpu::get_command_encoder(stream());
    std::vector<array> strided_sources, contiguous_copies;
    std::vector<Leaf> leaves;
    leaves.reserve(n);
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
    for (size_t i = 0; i < n; ++i) {
      // Before readable() below, which holds one more handle to its argument.
      bool fresh = !give_buffer(inputs[i], outputs[i], outputs.size());
      fresh = !give_buffer(inputs[2 * n + i], outputs[n + i], outputs.size()) && fresh;
      bool transposed = is_transposed_matrix(inputs[n + i]);
      array w = readable(inputs[i]), v = readable(inputs[2 * n + i]);
      array g = transposed ? inputs[n + i] : readable(inputs[n + i]);
      leaves.push_back({w.data<void>(), g.data<void>(), v.data<void>(), outputs[i].data<void>(),
                        outputs[n + i].data<void>(), outputs[i].size(), outputs[i].dtype().val(), outputs[i].itemsize(),
                        fresh, fresh, outputs[i].data_shared_ptr(), g.data_shared_ptr(),
                        outputs[n + i].data_shared_ptr(), transposed ? static_cast<size_t>(g.shape(1)) : 0});
    }
    Hyper h = hyper(alpha_, eps_);
    Precision precision = precision_;
    // The task holds weak copies only; MLX keeps the buffers alive (inputs, outputs, temporaries) until it ran.
    std::vector<std::pair<array, array>> gathers;
    for (size_t k = 0; k < strided_sources.size(); ++k) {
      gathers.emplace_back(array::unsafe_weak_copy(strided_sources[k]), array::unsafe_weak_copy(contiguous_copies[k]));
    }
    encoder.dispatch([leaves = std::move(leaves), h, lr = array::unsafe_weak_copy(inputs[3 * n]),
                      gathers = std::move(gathers), precision, threads = threads_]() mutable {
      for (auto& [source, copy] : gathers) {
        gather_row_major(source, copy);
      }
      h.lr = *lr.data<float>();
      for (const Leaf& leaf : leaves) {
        size_t bytes = leaf.size * leaf.itemsize;
        the_huge_pages->use_for(leaf.w_out, bytes, leaf.w_owner);
        the_huge_pages->use_for(leaf.g, bytes, leaf.g_owner);
        the_huge_pages->use_for(leaf.v_out, bytes, leaf.v_owner);
      }
      auto transposed = std::stable_partition(leaves.begin(), leaves.end(),
                                              [](const Leaf& leaf) { return leaf.g_transposed_columns == 0; });
      for (auto leaf = transposed; leaf != leaves.end(); ++leaf) {
        leaf->itemsize == 4 ? update_transposed<uint32_t>(*leaf, h, precision, threads)
                            : update_transposed<uint16_t>(*leaf, h, precision, threads);
      }
      leaves.erase(transposed, leaves.end());
      update_all(leaves, h, precision, threads);
    });
    encoder.add_temporaries(std::move(strided_sources));
    encoder.add_temporaries(std::move(contiguous_copies));
  }

  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("RMSpropStep runs on the CPU only; use the metal_kernel or cuda_kernel variant on a GPU.");
  }

  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    size_t n = (inputs.size() - 1) / 3;
    for (size_t i = 0; i < n; ++i) {
      check_leaf(i, inputs[i], inputs[n + i], inputs[2 * n + i]);
    }
    std::vector<Shape> shapes;
    for (size_t i = 0; i < n; ++i) shapes.push_back(inputs[i].shape());
    for (size_t i = 0; i < n; ++i) shapes.push_back(inputs[2 * n + i].shape());
    return shapes;
  }

  const char* name() const override {
    return "RMSpropStep";
  }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const RMSpropStep&>(other);
    return alpha_ == o.alpha_ && eps_ == o.eps_ && precision_ == o.precision_ && threads_ == o.threads_;
  }

  // The transforms run the formula in MLX ops, leaf by leaf: the inputs are w..., g..., v..., lr
  // and the outputs new w..., new v....
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>&) override {
    size_t n = (primals.size() - 1) / 3;
    std::vector<std::optional<array>> grads(primals.size());
    for (size_t i = 0; i < n; ++i) {
      auto [outs, vjps] = mlx::core::vjp(leaf_formula(), leaf_inputs(primals, i), {cotangents[i], cotangents[n + i]});
      for (size_t k = 0; k < 3; ++k) {
        grads[k * n + i] = vjps[k];
      }
      grads[3 * n] = grads[3 * n] ? add(*grads[3 * n], vjps[3], stream()) : vjps[3];
    }
    std::vector<array> result;
    for (int a : argnums) {
      result.push_back(*grads[a]);
    }
    return result;
  }

  std::vector<array> jvp(const std::vector<array>& primals, const std::vector<array>& tangents,
                         const std::vector<int>& argnums) override {
    size_t n = (primals.size() - 1) / 3;
    std::vector<array> full;
    for (const array& p : primals) {
      full.push_back(zeros_like(p, stream()));
    }
    for (size_t k = 0; k < argnums.size(); ++k) {
      full[argnums[k]] = tangents[k];
    }
    std::vector<array> out(2 * n, array(0.0f));
    for (size_t i = 0; i < n; ++i) {
      auto [outs, jvps] = mlx::core::jvp(leaf_formula(), leaf_inputs(primals, i), leaf_inputs(full, i));
      out[i] = jvps[0];
      out[n + i] = jvps[1];
    }
    return out;
  }

  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    size_t n = (inputs.size() - 1) / 3;
    // Batch axes to the front; an unbatched input broadcasts against a batched one as it is.
    std::vector<array> moved;
    for (size_t k = 0; k < inputs.size(); ++k) {
      moved.push_back(axes[k] < 0 || axes[k] == 0 ? inputs[k] : moveaxis(inputs[k], axes[k], 0, stream()));
    }
    std::vector<array> out(2 * n, array(0.0f));
    std::vector<int> out_axes(2 * n, -1);
    for (size_t i = 0; i < n; ++i) {
      array lr = moved[3 * n];
      if (axes[3 * n] >= 0) {  // a batch of learning rates: one per row of every leaf
        Shape shape(1 + ndim_of_leaf(inputs, axes, i), 1);
        shape[0] = lr.shape(0);
        lr = reshape(lr, shape, stream());
      }
      auto [nw, nv] = formula(moved[i], moved[n + i], moved[2 * n + i], lr, alpha_, eps_, precision_, stream());
      bool batched = axes[i] >= 0 || axes[n + i] >= 0 || axes[2 * n + i] >= 0 || axes[3 * n] >= 0;
      out[i] = nw;
      out[n + i] = nv;
      out_axes[i] = out_axes[n + i] = batched ? 0 : -1;
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

  std::function<std::vector<array>(const std::vector<array>&)> leaf_formula() {
    return [alpha = alpha_, eps = eps_, precision = precision_, s = stream()](const std::vector<array>& x) {
      auto [nw, nv] = formula(x[0], x[1], x[2], x[3], alpha, eps, precision, s);
      return std::vector<array>{nw, nv};
    };
  }

  static std::vector<array> leaf_inputs(const std::vector<array>& all, size_t i) {
    size_t n = (all.size() - 1) / 3;
    return {all[i], all[n + i], all[2 * n + i], all[3 * n]};
  }

  // The unbatched rank of leaf i.
  static int ndim_of_leaf(const std::vector<array>& inputs, const std::vector<int>& axes, size_t i) {
    return static_cast<int>(inputs[i].ndim()) - (axes[i] >= 0 ? 1 : 0);
  }

  double alpha_, eps_;
  Precision precision_;
  int threads_;
};

// One node per this many leaves. Each output of an MLX node holds a copy of the node's input list
// and of its sibling list, so a node of k leaves costs O(k^2) references: one node for a
// 16384-leaf tree would need tens of GB. Eight keeps that small and the nodes few.
constexpr size_t kLeavesPerNode = 8;

using rmsprop::tree::LeafArrays;
using Indices = std::vector<size_t>;  // of leaves

// One leaf's step: its new w and v. Empty where the step wrote into memory the caller already has:
// v over the old one, which the state holds, or w into the spare, whose object step_tree() returns.
struct Stepped {
  std::optional<array> w, v;
  nb::object w_spare;   // the spare's object, where w went into it
  bool packed = false;  // updated at once, outside the graph (then its new w is kept as a spare)
};

// Lazy: one RMSpropStep node per kLeavesPerNode of `which`, donating buffers at eval time.
void update_in_graph(const std::vector<LeafArrays>& leaves, const array& lr, const Indices& which,
                     const std::shared_ptr<RMSpropStep>& step, std::vector<Stepped>& out) {
  for (size_t lo = 0; lo < which.size(); lo += kLeavesPerNode) {
    size_t hi = std::min(which.size(), lo + kLeavesPerNode);
    std::vector<array> inputs;
    inputs.reserve(3 * (hi - lo) + 1);
    for (auto member : {&LeafArrays::w, &LeafArrays::g, &LeafArrays::v}) {
      for (size_t k = lo; k < hi; ++k) {
        inputs.push_back(*(leaves[which[k]].*member));
      }
    }
    inputs.push_back(lr);
    std::vector<Shape> shapes;
    std::vector<Dtype> dtypes;
    for (int twice = 0; twice < 2; ++twice) {
      for (size_t k = lo; k < hi; ++k) {
        shapes.push_back(leaves[which[k]].w->shape());
        dtypes.push_back(leaves[which[k]].w->dtype());
      }
    }
    auto outputs = array::make_arrays(std::move(shapes), dtypes, step, std::move(inputs));
    size_t n = hi - lo;
    for (size_t k = lo; k < hi; ++k) {
      out[which[k]].w = outputs[k - lo];
      out[which[k]].v = outputs[n + k - lo];
    }
  }
}

// Under a transform, which leaves run stock's own ops instead of an RMSpropStep node. A leaf whose v
// is a placeholder (a tracer with no primitive: an input of the mx.compile'd function, as the
// optimizer state is in mlx-lm's and mlx-examples' training steps) keeps the node, so a compiled
// training step runs the kernel. Every other traced leaf (mx.grad, vjp or jvp through the step,
// a compiled function that closes over the state) runs stock's ops, so that the gradients through
// a step are the ones MLX computes for stock, bit for bit: the node's vjp sums the learning
// rate's cotangents in another order. MLX's headers name no test for "in a gradient transform"
// that its library exports (0.32's InTracing and InExportTracing are hidden).
bool is_placeholder(const array& x) {
  return x.is_tracer() && !x.has_primitive();
}

void update_by_formula(const std::vector<LeafArrays>& leaves, const array& lr, const Indices& which, double alpha,
                       double eps, Precision precision, const Stream& s, std::vector<Stepped>& out) {
  for (size_t i : which) {
    auto [nw, nv] = formula(*leaves[i].w, *leaves[i].g, *leaves[i].v, lr, alpha, eps, precision, s);
    out[i].w = std::move(nw);
    out[i].v = std::move(nv);
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
// place (in_place.h): each v's Python object (held by the state and by the walk), and the spare w's.
struct Reuse {
  const std::vector<nb::object>* v_objects = nullptr;
  // A list: per leaf, its new w of the step before last (None where it was not a small leaf). The
  // caller has usually dropped them by now, and then they take this step's new w instead of new memory.
  PyObject* spare = nullptr;
};

// What a step needs of one leaf, read in one pass over its arrays (read_leaves()): on 16384 small
// leaves the arrays' descriptors (some 20 MB) fall out of the cache from one pass to the next, and
// every pass would wait on memory for each of them again.
struct LeafFacts {
  bool matches = false;  // w, g and v of one shape and of one dtype the kernel takes
  bool traced = false;   // one of them is a tracer (mx.compile, a grad): every leaf goes in the graph
  bool evaluated = false;
  bool packed = false;  // evaluated, row-major and small: updated at once, unless a leaf is traced
  size_t size = 0, itemsize = 0;
  Dtype::Val dtype = Dtype::Val::float32;
  const void *w = nullptr, *g = nullptr, *v = nullptr;
  Candidate v_buffer, spare_buffer;  // clauses 1-3 of in_place.h hold for the v, for the spare
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

// Every leaf's LeafFacts, in one pass that asks the cache for the leaves ahead.
std::vector<LeafFacts> read_leaves(const std::vector<LeafArrays>& leaves, const Reuse& reuse) {
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
      for (const array* x : {later.w, later.g, later.v}) {
        __builtin_prefetch(x);  // the handle, inside the Python object
      }
      if (i + 2 * kReadAhead < n_spares) {
        __builtin_prefetch(PyList_GET_ITEM(spares, i + 2 * kReadAhead));
      }
    }
    if (i + kReadAhead < n) {
      const LeafArrays& next = leaves[i + kReadAhead];
      for (const array* x : {next.w, next.g, next.v, spare_at(i + kReadAhead)}) {
        if (x) {
          prefetch_descriptor(*x);
        }
      }
    }
    const array &w = *leaves[i].w, &g = *leaves[i].g, &v = *leaves[i].v;
    LeafFacts& f = facts[i];
    f.matches = dtypes_match(w, g, v) && shapes_match(w, g, v);  // else check_leaf() says which
    if (!f.matches) {
      continue;
    }
    f.size = w.size();
    f.traced = w.is_tracer() || g.is_tracer() || v.is_tracer();
    f.evaluated = evaluated(w) && evaluated(g) && evaluated(v);
    f.packed = !f.traced && f.evaluated && f.size < kEagerMaxElements && w.flags().row_contiguous &&
               g.flags().row_contiguous && v.flags().row_contiguous;
    if (!f.packed) {
      continue;
    }
    f.itemsize = w.itemsize();
    f.dtype = w.dtype().val();
    f.w = w.data<void>();
    f.g = g.data<void>();
    f.v = v.data<void>();
    // The state's dict and the walk hold v's object.
    if (reuse.v_objects && unseen_alone((*reuse.v_objects)[i].ptr(), 2, v)) {
      f.v_buffer = Candidate::of(v);
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

std::atomic<uint64_t> v_in_place{0}, w_into_spares{0};

// The small leaves' update, planned: where each new w and v goes. Nothing is written until run().
struct SmallLeavesPlan {
  std::vector<Leaf> updates;
  size_t n_in_place = 0, n_spares = 0;

  void run(const array& lr, Hyper h, Precision precision, int threads) {
    if (updates.empty()) {
      return;  // then lr may be a tracer, with no data
    }
    h.lr = *lr.data<float>();
    v_in_place.fetch_add(n_in_place, std::memory_order_relaxed);
    w_into_spares.fetch_add(n_spares, std::memory_order_relaxed);
    update_all(updates, h, precision, threads);
  }
};

// Plans the small leaves: the new w into the spare and the new v over the old one where in_place.h's
// clause 4 allows, given clauses 1-3 from read_leaves(); elsewhere into fresh allocations, made here.
// Must be followed by run() with no Python code in between (clause 5).
SmallLeavesPlan plan_small_leaves(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts,
                                  const Indices& packed, std::vector<Stepped>& out) {
  // Every candidate of the step in one list, so that a v and a spare over the same bytes are caught too.
  std::vector<Candidate> candidates;
  candidates.reserve(2 * packed.size());
  size_t new_w_bytes = 0;
  for (size_t i : packed) {
    candidates.push_back(facts[i].v_buffer);
    candidates.push_back(facts[i].spare_buffer);
    new_w_bytes += facts[i].size * facts[i].itemsize;
  }
  keep_disjoint_and_unshared(candidates);
  SmallLeavesPlan plan;
  plan.updates.reserve(packed.size());
  bool stream = new_w_bytes >= kStreamMinBytes;
  for (size_t k = 0; k < packed.size(); ++k) {
    size_t i = packed[k];
    const LeafFacts& f = facts[i];
    const Candidate &v_in = candidates[2 * k], &w_in = candidates[2 * k + 1];
    Stepped& result = out[i];
    result.packed = true;
    void *w_out, *v_out;
    if (w_in) {
      result.w_spare = nb::borrow(f.spare);
      w_out = reinterpret_cast<void*>(w_in.begin);
      ++plan.n_spares;
    } else {
      result.w = fresh_like(*leaves[i].w);
      w_out = result.w->data<void>();
    }
    if (v_in) {
      v_out = const_cast<void*>(f.v);
      ++plan.n_in_place;
    } else {
      result.v = fresh_like(*leaves[i].w);
      v_out = result.v->data<void>();
    }
    plan.updates.push_back({f.w, f.g, f.v, w_out, v_out, f.size, f.dtype, f.itemsize, stream, stream && !v_in});
  }
  return plan;
}

// ------------------------------------------------------------------ a step ---

// A step over every leaf, planned from one read of the leaves: the small leaves' plan (run() writes
// them) and, already in `out`, the lazy results of the others.
struct Planned {
  std::vector<Stepped> out;
  SmallLeavesPlan small;
  array lr;  // the learning rate as a float32 scalar
};

// The arrays that must be evaluated before the small leaves can be updated now (gradients usually
// are not yet), or none: then the step can be planned from these facts.
std::vector<array> pending_inputs(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts,
                                  const array& lr32) {
  std::vector<array> pending;
  bool traced = lr32.is_tracer();
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!facts[i].matches) {
      check_leaf(i, *leaves[i].w, *leaves[i].g, *leaves[i].v);  // throws, naming what differs
    }
    traced = traced || facts[i].traced;
  }
  if (traced) {
    return pending;  // under a transform every leaf stays in the graph: a tracer has no data yet
  }
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!facts[i].evaluated && facts[i].size < kEagerMaxElements) {
      for (const array* x : {leaves[i].w, leaves[i].g, leaves[i].v}) {
        if (!evaluated(*x)) {
          pending.push_back(*x);
        }
      }
    }
  }
  if (!pending.empty() && !evaluated(lr32)) {
    pending.push_back(lr32);
  }
  return pending;
}

Planned plan_step(const std::vector<LeafArrays>& leaves, const std::vector<LeafFacts>& facts, const array& lr32,
                  double alpha, double eps, int threads, Precision precision) {
  size_t n = leaves.size();
  Planned p{std::vector<Stepped>(n), {}, lr32};
  bool traced = lr32.is_tracer();
  for (const LeafFacts& f : facts) {
    traced = traced || f.traced;
  }
  bool any_small = false;
  for (size_t i = 0; i < n && !traced; ++i) {
    any_small = any_small || facts[i].packed;
  }
  if (any_small && !evaluated(p.lr)) {
    eval(p.lr);  // a scalar, usually available already; with the GIL held, so no Python code runs meanwhile
  }
  Indices packed, in_graph;
  for (size_t i = 0; i < n; ++i) {
    (!traced && facts[i].packed ? packed : in_graph).push_back(i);
  }
  p.small = plan_small_leaves(leaves, facts, packed, p.out);
  Indices by_formula;
  if (traced) {
    auto stays = std::stable_partition(in_graph.begin(), in_graph.end(),
                                       [&](size_t i) { return is_placeholder(*leaves[i].v); });
    by_formula.assign(stays, in_graph.end());
    in_graph.erase(stays, in_graph.end());
  }
  Stream s = default_stream(Device::cpu);
  update_by_formula(leaves, p.lr, by_formula, alpha, eps, precision, s, p.out);
  update_in_graph(leaves, p.lr, in_graph, std::make_shared<RMSpropStep>(s, alpha, eps, precision, threads), p.out);
  return p;
}

void check_arguments(const array& lr, int threads) {
  if (lr.size() != 1) {
    throw std::invalid_argument("rmsprop_update: the learning rate must be a scalar");
  }
  if (threads < 1) {
    throw std::invalid_argument("rmsprop_update: threads must be >= 1");
  }
}

// Usually a float32 scalar already: then no op, and nothing to evaluate for the small leaves.
array as_float32_scalar(const array& lr) {
  Stream s = default_stream(Device::cpu);
  return lr.dtype() == float32 && lr.ndim() == 0 ? lr : reshape(astype(lr, float32, s), {}, s);
}

// How often a step evaluates lazy inputs and reads the leaves again before it leaves the ones still
// lazy to the graph: a thread that keeps making them lazy cannot hold a step in a loop.
constexpr int kEvalRounds = 2;

std::pair<std::vector<array>, std::vector<array>> rmsprop_update(const std::vector<array>& w,
                                                                 const std::vector<array>& g,
                                                                 const std::vector<array>& v, const array& lr,
                                                                 double alpha, double eps, int threads,
                                                                 const std::string& precision_name) {
  Precision precision = parse_precision(precision_name);
  check_arguments(lr, threads);
  size_t n = w.size();
  if (g.size() != n || v.size() != n) {
    throw std::invalid_argument("rmsprop_update: w, g and v need one entry per leaf each");
  }
  // The lists hold their own handles, so nothing here can be changed under the step, and with no
  // Reuse nothing is written in place.
  std::vector<LeafArrays> leaves;
  leaves.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    leaves.push_back({&w[i], &g[i], &v[i]});
  }
  array lr32 = as_float32_scalar(lr);
  std::vector<LeafFacts> facts;
  for (int round = 0;; ++round) {
    facts = read_leaves(leaves, Reuse{});
    std::vector<array> pending = pending_inputs(leaves, facts, lr32);
    if (pending.empty() || round == kEvalRounds) {
      break;
    }
    nb::gil_scoped_release no_gil;
    eval(pending);
  }
  Planned p = plan_step(leaves, facts, lr32, alpha, eps, threads, precision);
  p.small.run(p.lr, hyper(alpha, eps), precision, threads);
  std::pair<std::vector<array>, std::vector<array>> out;
  out.first.reserve(n);
  out.second.reserve(n);
  for (Stepped& leaf : p.out) {  // with no Reuse, every leaf has a new w and v
    out.first.push_back(std::move(*leaf.w));
    out.second.push_back(std::move(*leaf.v));
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
// them one after the other, b reading a's new v, which a step that reads every v first cannot do.
// A dict held by its parent and the walk alone is not shared, so only the others are looked up.
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
// the new v stored in the state, its step counter advanced, and (the new parameter tree, the new
// spare list) returned. None, with nothing changed, where the trees are not plain, a leaf's arrays
// disagree or two leaves share a state: the Python walk then runs, which names any problem and
// computes as stock does. `spare` holds the small leaves' new w of the step before last (None for
// the other leaves), which this step writes into where nothing else can see them; the list returned
// holds this step's, for the step after next.
//
// Transactional: every check, allocation and Python object is made before the first write, so an
// error leaves the parameters and the state as they were. Between the last walk and the writes the
// GIL is held and the collector paused (in_place.h, clause 5).
nb::object step_tree(nb::handle gradients, nb::handle parameters, nb::dict state, const array& lr, double alpha,
                     double eps, int threads, const std::string& precision_name, nb::list spare) {
  static const rmsprop::tree::Walker* walker = new rmsprop::tree::Walker();  // leaked: holds a Python str
  Precision precision = parse_precision(precision_name);
  check_arguments(lr, threads);
  if (!PyDict_Check(gradients.ptr())) {
    return nb::none();
  }
  GcPaused no_collection;
  array lr32 = as_float32_scalar(lr);
  rmsprop::tree::Leaves leaves;
  std::vector<LeafFacts> facts;
  for (int round = 0;; ++round) {
    leaves = {};
    leaves.reserve(PyList_GET_SIZE(spare.ptr()));  // as many as the last step had, usually
    if (!walker->walk(gradients.ptr(), parameters.ptr(), state.ptr(), leaves) || shares_a_state(leaves)) {
      return nb::none();
    }
    facts = read_leaves(leaves.arrays, Reuse{&leaves.v_objects, spare.ptr()});
    std::vector<array> pending;
    try {
      pending = pending_inputs(leaves.arrays, facts, lr32);
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
  if (!step || !walker->is_array(step)) {
    return nb::none();
  }
  array next_step = advanced(*nb::inst_ptr<array>(step));
  Planned p = plan_step(leaves.arrays, facts, lr32, alpha, eps, threads, precision);
  size_t n = p.out.size();
  // Every Python object the step hands out, made before anything is written.
  std::vector<nb::object> new_leaves, new_vs(n);
  new_leaves.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    Stepped& leaf = p.out[i];
    new_leaves.push_back(leaf.w ? nb::cast(std::move(*leaf.w)) : std::move(leaf.w_spare));
    if (leaf.v) {  // else updated in place: the state holds it already
      new_vs[i] = nb::cast(std::move(*leaf.v));
    }
  }
  nb::object new_parameters = walker->rebuild(gradients.ptr(), new_leaves);
  // Only small leaves' w's are kept: holding a big leaf's would stop the next step donating it.
  nb::object next_spare = nb::steal(PyList_New(static_cast<Py_ssize_t>(n)));
  if (!next_spare.is_valid()) {
    throw nb::python_error();
  }
  for (size_t i = 0; i < n; ++i) {
    PyList_SET_ITEM(next_spare.ptr(), static_cast<Py_ssize_t>(i), nb::object(p.out[i].packed ? new_leaves[i] : nb::none()).release().ptr());
  }
  nb::object new_step = nb::cast(std::move(next_step));
  nb::object result = nb::make_tuple(new_parameters, next_spare);
  // The writes. Replacing a dict's existing entry allocates nothing, and the walk still holds every
  // old v, so no object is freed (and no finalizer runs) until the step has returned.
  p.small.run(p.lr, hyper(alpha, eps), precision, threads);
  for (size_t i = 0; i < n; ++i) {
    if (new_vs[i].is_valid()) {
      walker->set_v(leaves.states[i], std::move(new_vs[i]));
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
  auto [nw, nv] = rmsprop_update({w}, {g}, {v}, array(0.5f), 0.5, 1e-6, 1, "stock");
  eval({nw[0], nv[0]});
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
  m.doc() = "A fused, multi-tensor, threaded RMSprop step for MLX's CPU back-end.";
  check_nanobind_abi();
  check_donation_invariant();
  m.attr("MLX_VERSION") = RMSPROP_MLX_VERSION;
  m.def("rmsprop_update", &rmsprop_update, "w"_a, "g"_a, "v"_a, "lr"_a, "alpha"_a, "eps"_a, "threads"_a,
        "precision"_a = "stock",
        "One step over every leaf: returns (new w list, new v list). precision=\"stock\" rounds as stock RMSprop "
        "does in every dtype; \"float32\" computes in float32 and rounds once.");
  m.def("step_tree", &step_tree, "gradients"_a, "parameters"_a, "state"_a, "lr"_a, "alpha"_a, "eps"_a, "threads"_a,
        "precision"_a, "spare"_a,
        "One whole optimizer step: walks the trees, updates every leaf, stores each new v in the state and advances "
        "state['step']; returns the new parameter tree, or None (nothing changed) where the trees are not plain "
        "dicts, lists and tuples of arrays with the stock state. spare: a list of the step before last's new "
        "packed w's, written into where nothing else holds them, and refilled with this step's.");
  m.def("hardware_threads", [] { return std::max(1u, std::thread::hardware_concurrency()); },
        "The number of hardware threads, the default thread count.");
  m.def("donated_buffers", [] { return donated_buffers.load(); },
        "How many outputs so far reused an input's buffer instead of allocating one.");
  m.def("v_updated_in_place", [] { return v_in_place.load(); },
        "How many leaves' v so far were updated in place, as nothing but the optimizer state could see them.");
  m.def("w_into_spares", [] { return w_into_spares.load(); },
        "How many leaves' new w so far went into a spare: a w of the step before last that nothing else held.");
  m.def("huge_page_moves", [] { return the_huge_pages->moves(); },
        "How many long-lived buffers so far were moved onto 2 MiB pages.");
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
