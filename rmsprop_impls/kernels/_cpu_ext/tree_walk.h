// The optimizer's tree walk in C++: gradients, parameters and state walked together in one call,
// so that a step over 16384 leaves crosses between Python and C++ once, not once per leaf and
// list. It takes only plain trees (dicts, lists and tuples of mx.array, and the stock state
// layout) and says no to anything else; the Python walk (tree_paths.py) then runs instead and
// names what is wrong, so both walks accept the same trees and report errors one way.
#pragma once

#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "generated/rules_table.h"
#include "mlx/array.h"

namespace rmsprop::tree {

namespace nb = nanobind;
using mlx::core::array;

using rules::kMaxStates;

// One leaf's arrays, by address: a step copies no array handle, since a copy and its release are
// atomic operations on the array's descriptor, which on 16384 leaves is not in the cache. A state
// the step's kernel neither reads nor writes is null.
struct LeafArrays {
  const array* w = nullptr;
  const array* g = nullptr;
  const array* s[kMaxStates] = {};
};

// The leaves of one step, in the gradients' order, with the Python objects that hold their arrays:
// held, not borrowed, since the step releases the GIL to evaluate lazy gradients and another thread
// may drop them meanwhile.
struct Leaves {
  std::vector<LeafArrays> arrays;
  std::vector<nb::object> g_objects, w_objects, states;
  std::vector<nb::object> s_objects[kMaxStates];  // per state of the rule; empty for one not used
  // Whether Module.update, given the new tree, would store each new w where the old one was: no
  // tuple on the way (it raises there, leaving the leaves after it as they were), and every container
  // of the parameters a dict or list whose item assignment is dict's or list's own (nn.Module's is).
  // Where not, the step writes no w over the old one.
  bool assigned_back = true;

  void reserve(size_t n) {
    arrays.reserve(n);
    for (auto* objects : {&g_objects, &w_objects, &states, &s_objects[0], &s_objects[1]}) {
      objects->reserve(n);
    }
  }
};

class Walker {
 public:
  // `states`: the rule's state names, in its order; an empty name is a state the step does not use.
  explicit Walker(const std::vector<std::string>& states)
      : array_type_(reinterpret_cast<PyTypeObject*>(nb::type<array>().ptr())) {
    if (states.size() > kMaxStates) {
      throw std::invalid_argument("cpu_kernel: a rule of more than " + std::to_string(kMaxStates) + " states");
    }
    for (size_t j = 0; j < states.size(); ++j) {
      if (states[j].empty()) continue;
      // Interned, as the state dicts' own keys are: a lookup then matches them by address.
      PyObject* key = PyUnicode_FromString(states[j].c_str());
      if (!key) throw nb::python_error();
      PyUnicode_InternInPlace(&key);
      keys_[j] = nb::steal(key);
    }
  }

  // Appends the leaves of (g, w, s) to `out`; false where a tree is not plain or leaves disagree.
  bool walk(PyObject* g, PyObject* w, PyObject* s, Leaves& out, int depth = 0) const {
    if (depth > kMaxDepth) {
      return false;
    }
    if (Py_TYPE(g) == array_type_) {
      return leaf(g, w, s, out);
    }
    if (PyDict_Check(g) && PyDict_GET_SIZE(g) == 0) {
      return true;  // no leaves: stock maps over the gradients and never looks at the parameter (mlx-lm's layer_types)
    }
    if (PyDict_Check(g)) {
      if (!PyDict_Check(w) || !PyDict_Check(s)) {
        return false;
      }
      out.assigned_back = out.assigned_back && assigns_as(w, &PyDict_Type);
      Py_ssize_t position = 0;
      PyObject *key, *gk;
      while (PyDict_Next(g, &position, &key, &gk)) {
        if (!PyUnicode_CheckExact(key)) {
          return false;  // hashing or comparing another key could run Python code mid-walk
        }
        PyObject* wk = PyDict_GetItemWithError(w, key);
        PyObject* sk = wk ? PyDict_GetItemWithError(s, key) : nullptr;
        if (!sk || !walk(gk, wk, sk, out, depth + 1)) {
          PyErr_Clear();  // a key that hashes badly: the Python walk raises it
          return false;
        }
      }
      return true;
    }
    if (PyList_CheckExact(g) || PyTuple_CheckExact(g)) {
      Py_ssize_t n = PySequence_Fast_GET_SIZE(g);
      out.assigned_back = out.assigned_back && !PyTuple_Check(g) && assigns_as(w, &PyList_Type);
      if (n == 0) {
        return true;  // as an empty dict
      }
      if (!is_sequence(w) || !is_sequence(s) || PySequence_Fast_GET_SIZE(w) != n || PySequence_Fast_GET_SIZE(s) != n) {
        return false;
      }
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (!walk(PySequence_Fast_GET_ITEM(g, i), PySequence_Fast_GET_ITEM(w, i), PySequence_Fast_GET_ITEM(s, i), out,
                  depth + 1)) {
          return false;
        }
      }
      return true;
    }
    return false;
  }

  // A tree shaped like `g` (plain dicts, lists and tuples) holding `leaves`, in walk order. The
  // step released the GIL since the walk, so `g` is checked again: another thread may have changed it.
  nb::object rebuild(PyObject* g, const std::vector<nb::object>& leaves) const {
    auto next = leaves.cbegin();
    nb::object tree = rebuild(g, next, leaves.cend(), 0);
    if (next != leaves.cend()) {
      throw changed();
    }
    return tree;
  }

  // Stores a new state array j in a state dict the walk returned.
  void set_state(const nb::object& state, size_t j, nb::object x) const {
    nb::borrow<nb::dict>(state)[keys_[j]] = std::move(x);
  }

  bool is_array(PyObject* x) const {
    return Py_TYPE(x) == array_type_;
  }

 private:
  using Next = std::vector<nb::object>::const_iterator;

  nb::object rebuild(PyObject* g, Next& next, Next end, int depth) const {
    if (Py_TYPE(g) == array_type_ && next != end) {
      return *next++;
    }
    if (PyDict_Check(g) && depth < kMaxDepth) {
      nb::dict out;
      Py_ssize_t position = 0;
      PyObject *key, *gk;
      while (PyDict_Next(g, &position, &key, &gk)) {
        if (!PyUnicode_CheckExact(key)) {
          throw changed();
        }
        out[nb::handle(key)] = rebuild(gk, next, end, depth + 1);
      }
      return out;
    }
    if ((PyList_CheckExact(g) || PyTuple_CheckExact(g)) && depth < kMaxDepth) {
      Py_ssize_t n = PySequence_Fast_GET_SIZE(g);
      nb::list items;
      for (Py_ssize_t i = 0; i < n && i < PySequence_Fast_GET_SIZE(g); ++i) {
        items.append(rebuild(PySequence_Fast_GET_ITEM(g, i), next, end, depth + 1));
      }
      return PyTuple_CheckExact(g) ? nb::object(nb::tuple(items)) : nb::object(items);
    }
    throw changed();
  }

  static std::runtime_error changed() {
    return std::runtime_error("cpu_kernel: the gradient tree changed (in another thread) while the step ran");
  }

  // A gradient leaf, its parameter, and the stock state {"m": array, "v": array, ...}, of which the
  // states the step uses must be arrays. Their shapes and dtypes are compared where the step reads
  // the arrays (read_leaves() in rmsprop_cpu.cpp), in the same pass.
  bool leaf(PyObject* g, PyObject* w, PyObject* s, Leaves& out) const {
    if (Py_TYPE(w) != array_type_ || !PyDict_CheckExact(s)) {
      return false;
    }
    PyObject* found[kMaxStates] = {};
    for (size_t j = 0; j < kMaxStates; ++j) {
      if (!keys_[j].is_valid()) {
        continue;
      }
      found[j] = PyDict_GetItemWithError(s, keys_[j].ptr());
      if (!found[j] || Py_TYPE(found[j]) != array_type_) {
        PyErr_Clear();
        return false;
      }
    }
    LeafArrays arrays{nb::inst_ptr<array>(w), nb::inst_ptr<array>(g), {}};
    for (size_t j = 0; j < kMaxStates; ++j) {
      if (found[j]) {
        arrays.s[j] = nb::inst_ptr<array>(found[j]);
        out.s_objects[j].push_back(nb::borrow(found[j]));
      }
    }
    out.arrays.push_back(arrays);
    out.g_objects.push_back(nb::borrow(g));
    out.w_objects.push_back(nb::borrow(w));
    out.states.push_back(nb::borrow(s));
    return true;
  }

  static bool is_sequence(PyObject* x) {
    return PyList_Check(x) || PyTuple_Check(x);
  }

  // Whether `container[key] = value` runs `base`'s own item assignment on this container (a subclass
  // that defines __setitem__ has a slot of its own); false for a tuple, which has none.
  static bool assigns_as(PyObject* container, PyTypeObject* base) {
    PyMappingMethods* mine = Py_TYPE(container)->tp_as_mapping;
    return mine && PyObject_TypeCheck(container, base) &&
           mine->mp_ass_subscript == base->tp_as_mapping->mp_ass_subscript;
  }

  // Deeper than any model: a cyclic or absurd tree goes to the Python walk.
  static constexpr int kMaxDepth = 256;
  PyTypeObject* array_type_;
  nb::object keys_[kMaxStates];  // a str each; invalid where the step does not use that state
};

}  // namespace rmsprop::tree
