"""The per-element update language: each rule writes its update once, as a Python function.

A rule's ``element(e, h, x)`` reads its inputs from ``x`` (``x.w``, ``x.g``, one
name per state array, ``x.lr`` and the rule's per-step inputs), its
hyper-parameters from ``h``, and the few functions it needs from ``e``
(``e.sqrt``, ``e.square``, ``e.abs``, ``e.sign``, ``e.maximum``, ``e.cast``), and
returns ``(new_w, {state name: new array})``. The same function runs two ways:

- on ``mx.array`` values with :data:`MLX_OPS`: then it *is* stock's update, op
  for op, with stock's weakly typed Python constants and its casts, so every
  variant that runs MLX ops computes what the stock class computes;
- on the values of a :class:`Trace`: then it records the update as a list of
  :class:`Node` s, the one description that the C++, Metal and CUDA kernels and
  the host simulations are generated from.

Three kinds of value flow through a trace, as through stock's ops:

- ``T``: an array of the leaf's storage dtype (w, g, the state, ``lr`` once
  cast); every operation on it is rounded to ``T`` in stock's precision;
- ``float32``: a float32 value (the raw learning rate, Adam's bias
  corrections); operations on it stay in float32;
- constants: Python numbers (the hyper-parameters) are folded in double, as
  Python folds ``1 - beta1``, and become a scalar *slot* where they meet an
  array, taking the array's kind, as MLX's weak scalars do. A slot's value is
  passed to the kernel each step (float32, then rounded to ``T`` where it meets
  a ``T`` value), so one kernel serves every value of a hyper-parameter.

A comparison of a constant (``if h.momentum <= 0``) gives a Python ``bool``:
the branches a hyper-parameter takes change the recorded nodes, and the
nodes' :meth:`Trace.signature` names the kernel that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import mlx.core as mx

T = "T"
F32 = "float32"
#: Unary and binary operations, as stock's MLX ops name them.
UNARY = ("sqrt", "square", "abs", "sign", "cast")
BINARY = ("add", "sub", "mul", "div", "maximum")

MLX_OPS = SimpleNamespace(
    sqrt=mx.sqrt,
    rsqrt=mx.rsqrt,
    square=mx.square,
    abs=mx.abs,
    sign=mx.sign,
    maximum=mx.maximum,
    cast=lambda x, like: x.astype(like.dtype),
)
"""``e`` for running an element function on ``mx.array`` values: stock's own ops."""


@dataclass(frozen=True)
class Node:
    """One value of a traced update.

    ``op`` is ``"input"`` (``name`` an input's name), ``"slot"`` (``slot`` an index
    into :attr:`Trace.slots`), or one of :data:`UNARY` and :data:`BINARY` over
    the nodes ``args`` (indices into :attr:`Trace.nodes`). ``kind`` is
    :data:`T` or :data:`F32`; ``uniform`` says the value is the same for every
    element (slots, ``lr``, per-step inputs and what is computed from them only).
    """

    op: str
    args: tuple[int, ...]
    kind: str
    uniform: bool
    name: str = ""
    slot: int = -1


class Const:
    """A hyper-parameter, or a number computed from them, folded in double until it meets an array."""

    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = value

    def _fold(self, other: Any, f: Callable[[Any, Any], Any]) -> Any:
        if isinstance(other, Const):
            return Const(f(self.value, other.value))
        if isinstance(other, (int, float)):
            return Const(f(self.value, other))
        return NotImplemented

    def __add__(self, o):
        return self._fold(o, lambda a, b: a + b)

    def __radd__(self, o):
        return self._fold(o, lambda a, b: b + a)

    def __sub__(self, o):
        return self._fold(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._fold(o, lambda a, b: b - a)

    def __mul__(self, o):
        return self._fold(o, lambda a, b: a * b)

    def __rmul__(self, o):
        return self._fold(o, lambda a, b: b * a)

    def __truediv__(self, o):
        return self._fold(o, lambda a, b: a / b)

    def __rtruediv__(self, o):
        return self._fold(o, lambda a, b: b / a)

    def __lt__(self, o):
        return self.value < _number(o)

    def __le__(self, o):
        return self.value <= _number(o)

    def __gt__(self, o):
        return self.value > _number(o)

    def __ge__(self, o):
        return self.value >= _number(o)

    def __eq__(self, o):
        return self.value == _number(o)

    def __ne__(self, o):
        return self.value != _number(o)

    __hash__ = None  # compared by value, like the float it stands for

    def __repr__(self) -> str:
        return f"Const({self.value!r})"


def _number(x: Any) -> float:
    return x.value if isinstance(x, Const) else x


class Value:
    """A traced array value: an index into its trace's nodes."""

    __slots__ = ("trace", "index")

    def __init__(self, trace: Trace, index: int):
        self.trace = trace
        self.index = index

    @property
    def node(self) -> Node:
        return self.trace.nodes[self.index]

    def _binary(self, op: str, other: Any, reflected: bool = False) -> Value:
        a, b = (other, self) if reflected else (self, other)
        return self.trace.binary(op, a, b)

    def __add__(self, o):
        return self._binary("add", o)

    def __radd__(self, o):
        return self._binary("add", o, True)

    def __sub__(self, o):
        return self._binary("sub", o)

    def __rsub__(self, o):
        return self._binary("sub", o, True)

    def __mul__(self, o):
        return self._binary("mul", o)

    def __rmul__(self, o):
        return self._binary("mul", o, True)

    def __truediv__(self, o):
        return self._binary("div", o)

    def __rtruediv__(self, o):
        return self._binary("div", o, True)


class Trace:
    """A recorded element function: its nodes, its constant slots and which nodes it returns."""

    def __init__(self, t_inputs: tuple[str, ...], f32_inputs: tuple[str, ...]):
        self.nodes: list[Node] = []
        self.slots: list[float] = []
        #: The element function's results: the new w, and each changed state array by name.
        self.w_out = -1
        self.state_out: dict[str, int] = {}
        self.inputs = {name: self._add(Node("input", (), T, False, name=name)) for name in t_inputs}
        for name in f32_inputs:
            self.inputs[name] = self._add(Node("input", (), F32, True, name=name))

    def _add(self, node: Node) -> Value:
        self.nodes.append(node)
        return Value(self, len(self.nodes) - 1)

    def _operand(self, x: Any, kind: str) -> Value:
        """``x`` as a node: a traced value as it is, a number or constant as a new slot of ``kind``."""
        if isinstance(x, Value):
            if x.trace is not self:
                raise ValueError("a value of another trace")
            return x
        if isinstance(x, bool) or not isinstance(x, (Const, int, float)):
            raise TypeError(f"an element function computes on arrays and numbers, not {type(x).__name__}")
        self.slots.append(float(_number(x)))
        return self._add(Node("slot", (), kind, True, slot=len(self.slots) - 1))

    def binary(self, op: str, a: Any, b: Any) -> Value:
        kinds = [x.node.kind for x in (a, b) if isinstance(x, Value)]
        # MLX's promotion: a T array meeting a float32 one computes in float32; a number takes the array's dtype.
        kind = F32 if F32 in kinds else T
        a, b = self._operand(a, kind), self._operand(b, kind)
        return self._add(Node(op, (a.index, b.index), kind, a.node.uniform and b.node.uniform))

    def unary(self, op: str, x: Value, kind: str | None = None) -> Value:
        if not isinstance(x, Value):
            raise TypeError(f"{op} takes a traced array, not {type(x).__name__}")
        return self._add(Node(op, (x.index,), kind or x.node.kind, x.node.uniform))

    def returns(self, w: Value, states: Mapping[str, Value]) -> None:
        self.w_out = w.index
        self.state_out = {name: v.index for name, v in states.items()}

    def signature(self) -> tuple:
        """What a kernel generated from this trace depends on: its nodes and results, not the slots' values."""
        return (tuple(self.nodes), self.w_out, tuple(sorted(self.state_out.items())))

    def used_inputs(self) -> set[str]:
        """The inputs the results depend on (a state array that is neither read nor written is not streamed)."""
        live, stack = set(), [self.w_out, *self.state_out.values()]
        while stack:
            i = stack.pop()
            if i in live:
                continue
            live.add(i)
            stack.extend(self.nodes[i].args)
        return {n.name for i, n in enumerate(self.nodes) if n.op == "input" and i in live}


class TraceOps:
    """``e`` for tracing: the functions an element function may call, recorded into ``trace``."""

    def __init__(self, trace: Trace):
        self._trace = trace

    def sqrt(self, x: Value) -> Value:
        return self._trace.unary("sqrt", x)

    def square(self, x: Value) -> Value:
        return self._trace.unary("square", x)

    def abs(self, x: Value) -> Value:
        return self._trace.unary("abs", x)

    def sign(self, x: Value) -> Value:
        return self._trace.unary("sign", x)

    def maximum(self, a: Any, b: Any) -> Value:
        return self._trace.binary("maximum", a, b)

    def cast(self, x: Value, like: Value) -> Value:
        """``x.astype(like.dtype)``: in a trace, ``like`` is always a ``T`` leaf."""
        return self._trace.unary("cast", x, T)


def constants(hyper: Mapping[str, Any]) -> SimpleNamespace:
    """``h`` for tracing: numbers as :class:`Const`, tuples of numbers as tuples of them, the rest as it is."""

    def wrap(x: Any) -> Any:
        if isinstance(x, bool) or not isinstance(x, (int, float, tuple, list)):
            return x
        if isinstance(x, (tuple, list)):
            return tuple(wrap(y) for y in x)
        return Const(x)

    return SimpleNamespace(**{k: wrap(v) for k, v in hyper.items()})


def trace(element: Callable, hyper: Mapping[str, Any], states: tuple[str, ...], step_inputs: tuple[str, ...]) -> Trace:
    """Record ``element`` for these hyper-parameter values: w, g and ``states`` are ``T`` inputs, ``lr`` and
    ``step_inputs`` float32 ones."""
    t = Trace(("w", "g", *states), ("lr", *step_inputs))
    w, new_states = element(TraceOps(t), constants(hyper), SimpleNamespace(**t.inputs))
    unknown = set(new_states) - set(states)
    if unknown:
        raise ValueError(f"the element function returns state {sorted(unknown)} it does not declare")
    t.returns(w, new_states)
    return t
