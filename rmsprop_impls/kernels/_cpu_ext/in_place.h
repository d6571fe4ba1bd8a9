// When a step may write into memory it did not allocate: the one invariant behind every in-place
// write of the small-leaf path (a leaf's v overwritten, a new w written into a spare or, under
// Optimizer.update(model, ...), over the old w), checked here and nowhere else.
//
// INVARIANT. A step writes into an array's bytes only if no one but the optimizer can ever read
// them again, and no two writes of the step touch the same byte:
//   1. the array's Python object is held by exactly the references the optimizer accounts for
//      (the state dict and the walk for a v; the spare list for a spare; for a w, its container in
//      the model and the walk, and only where the caller is Optimizer.update(model, ...), whose
//      Module.update then puts the same object back into that container: no tuple on the way, no
//      container with an item assignment of its own; tree_walk.h's Leaves::assigned_back), with
//      no weak references;
//   2. its mlx::core::array handle is held by that Python object alone: no graph node, tracer,
//      transform or other Python object holds it;
//   3. it is evaluated, with no primitive behind it, row-major and whole (data_size == size), in
//      memory MLX's allocator owns;
//   4. every array that holds its buffer is itself a candidate of this step (a view, a reshape,
//      a stop_gradient or any other array over the same buffer makes the whole buffer read-only),
//      and the candidates' byte ranges are pairwise disjoint;
//   5. from the check to the write no Python code runs: the GIL is held throughout, and the
//      garbage collector is paused (GcPaused), so no finalizer and no other thread can take a new
//      reference or replace a state entry in between. Every GIL release (to evaluate lazy
//      gradients) is followed by a new walk of the trees and new checks.
// Anything that fails a check is written out of place, into memory of its own: a program can tell
// the difference only by speed.
#pragma once

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <functional>
#include <vector>

#include "mlx/array.h"
#include "mlx_compat.h"

namespace rmsprop::in_place {

using mlx::core::array;

// How many handles share this array's descriptor (mlx::core::array is one shared_ptr).
inline long handles(const array& x) {
  static_assert(sizeof(array) == sizeof(std::shared_ptr<void>), "mlx::core::array is one shared_ptr");
  return reinterpret_cast<const std::shared_ptr<void>&>(x).use_count();
}

// is_available(), without the call where the status says so already.
inline bool evaluated(const array& x) {
  return x.status() == array::Status::available || x.is_available();
}

// Whether a Python object has weak references, which would see its values change in place.
// nanobind gives mx.array an explicit weak-list slot; a type with managed weak references
// (CPython 3.12+) cannot be asked as cheaply, so its objects count as having some.
inline bool has_weak_references(PyObject* object) {
#ifdef Py_TPFLAGS_MANAGED_WEAKREF
  if (PyType_HasFeature(Py_TYPE(object), Py_TPFLAGS_MANAGED_WEAKREF)) {
    return true;
  }
#endif
  Py_ssize_t offset = Py_TYPE(object)->tp_weaklistoffset;
  return offset <= 0 || *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(object) + offset) != nullptr;
}

// Clauses 1 to 3 for one array: `refs` references on its Python object, one handle on its array.
inline bool unseen_alone(PyObject* object, Py_ssize_t refs, const array& x) {
  return Py_REFCNT(object) == refs && !has_weak_references(object) && handles(x) == 1 && evaluated(x) &&
         !x.has_primitive() && !x.is_tracer() && x.flags().row_contiguous && x.data_size() == x.size() &&
         x.size() > 0 && mlx_compat::allocator_owns(*x.data_shared_ptr());
}

// An array a step may write into, as far as clauses 1 to 3 can tell; empty where it may not.
struct Candidate {
  const array::Data* buffer = nullptr;
  const std::shared_ptr<array::Data>* owner = nullptr;  // one of the buffer's holders, for their count
  uintptr_t begin = 0, end = 0;                          // the bytes it would write

  static Candidate of(const array& x) {
    auto begin = reinterpret_cast<uintptr_t>(x.data<void>());
    return {x.data_shared_ptr().get(), &x.data_shared_ptr(), begin, begin + x.nbytes()};
  }

  explicit operator bool() const {
    return buffer != nullptr;
  }
};

// Clause 4 over all of one step's candidates at once: empties every candidate whose buffer has a
// holder that is not a candidate, or whose bytes overlap another candidate's. A buffer with one
// holder has one candidate and nothing else: only the others (rare) are sorted by buffer and
// address and counted, so that a step over 16384 small leaves allocates nothing here.
inline void keep_disjoint_and_unshared(std::vector<Candidate>& candidates) {
  std::vector<size_t> shared;
  for (size_t k = 0; k < candidates.size(); ++k) {
    if (candidates[k] && candidates[k].owner->use_count() != 1) {
      shared.push_back(k);
    }
  }
  std::sort(shared.begin(), shared.end(), [&](size_t x, size_t y) {
    const Candidate &a = candidates[x], &b = candidates[y];
    return a.buffer != b.buffer ? std::less<const array::Data*>()(a.buffer, b.buffer) : a.begin < b.begin;
  });
  for (size_t lo = 0, hi; lo < shared.size(); lo = hi) {
    const array::Data* buffer = candidates[shared[lo]].buffer;
    bool disjoint = true;
    for (hi = lo + 1; hi < shared.size() && candidates[shared[hi]].buffer == buffer; ++hi) {
      disjoint = disjoint && candidates[shared[hi - 1]].end <= candidates[shared[hi]].begin;
    }
    bool writable = disjoint && candidates[shared[lo]].owner->use_count() == static_cast<long>(hi - lo);
    for (size_t m = lo; m < hi && !writable; ++m) {
      candidates[shared[m]] = {};
    }
  }
}

// Clause 5's collector half: no garbage collection (so no finalizer, so no Python code) runs
// while this lives. Restores the collector as it found it; let_run() hands it back across a GIL
// release, after which the caller must walk and check again.
class GcPaused {
 public:
  GcPaused() : was_enabled_(PyGC_Disable()) {}
  ~GcPaused() {
    if (was_enabled_) {
      PyGC_Enable();
    }
  }
  GcPaused(const GcPaused&) = delete;
  GcPaused& operator=(const GcPaused&) = delete;

  template <typename Fn>
  void let_run(Fn&& fn) {
    if (was_enabled_) {
      PyGC_Enable();
    }
    fn();
    was_enabled_ = PyGC_Disable();
  }

 private:
  int was_enabled_;
};

}  // namespace rmsprop::in_place
