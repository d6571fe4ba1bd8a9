"""Any rule's step in numpy, in place: its trace (:meth:`~rmsprop_impls.rules.Rule.trace`) run with numpy's
ufuncs and ``out=`` buffers, so no rule has a numpy copy of its own and no array is allocated per step.

The nodes that are the same for every element (slots, the learning rate, the per-step inputs and what is
computed from them only) are numpy scalars computed once per step; every other node is a ufunc into one of a
few scratch buffers, reused as soon as no later node reads them (so Adam needs four, not one per node). A
result is written straight into its parameter or state array where no later node reads that array's old
value, and copied there at the end otherwise (Lion reads the old ``m`` twice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..rules import Rule, rule
from ..rules.codegen import live_nodes
from ..rules.element import F32, Node, Trace

_UFUNCS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "maximum": np.maximum,
    "sqrt": np.sqrt,
    "square": np.square,
    "abs": np.abs,
    "sign": np.sign,
}

#: ``e`` for a rule's per-step inputs in float32 numpy scalars, as stock computes them in float32.
FLOAT32_OPS = SimpleNamespace(rsqrt=lambda x: np.float32(1) / np.sqrt(np.float32(x)))


class NumpyRuleStep:
    """One rule with fixed hyper-parameters over lists of numpy leaves (float32 or float16), updated in place."""

    def __init__(self, optimizer: str | Rule, hyper: Mapping[str, Any], dtype: np.dtype, largest: int):
        self.rule = rule(optimizer)
        self.hyper = dict(hyper)
        self.trace: Trace = self.rule.trace(self.hyper)
        self.dtype = np.dtype(dtype)
        self.order = live_nodes(self.trace)
        self._plan_registers(largest)

    def _dtype_of(self, node: Node) -> np.dtype:
        return np.dtype(np.float32) if node.kind == F32 else self.dtype

    def _plan_registers(self, largest: int) -> None:
        """Which buffer each per-element node writes: a destination array, or a scratch buffer nobody reads."""
        t, nodes = self.trace, self.trace.nodes
        last_read: dict[int, int] = {}
        for position, i in enumerate(self.order):
            for a in nodes[i].args:
                last_read[a] = position
        reads_of_input = {nodes[i].name: last_read.get(i, -1) for i in self.order if nodes[i].op == "input"}
        results = {t.w_out: "w", **{i: name for name, i in t.state_out.items()}}
        self.direct: dict[int, str] = {}  # node -> the array it is written into
        self.slot_of: dict[int, int] = {}  # node -> its scratch buffer
        self.copies: list[tuple[str, int]] = []  # results copied into their array at the end
        free: dict[np.dtype, list[int]] = {}
        self.scratch_dtypes: list[np.dtype] = []
        for position, i in enumerate(self.order):
            node = nodes[i]
            if node.op in ("input", "slot") or node.uniform:
                continue
            dest = results.get(i)
            if dest is not None and reads_of_input.get(dest, -1) <= position and self._dtype_of(node) == self.dtype:
                if dest not in self.direct.values():
                    self.direct[i] = dest
                    continue
            dtype = self._dtype_of(node)
            pool = free.setdefault(dtype, [])
            if pool:
                self.slot_of[i] = pool.pop()
            else:
                self.slot_of[i] = len(self.scratch_dtypes)
                self.scratch_dtypes.append(dtype)
            if dest is not None:
                self.copies.append((dest, i))
            for a in set(node.args):  # the arguments this node read last are free for the nodes after it
                if a in self.slot_of and last_read.get(a) == position and a not in dict(self.copies).values():
                    free[self._dtype_of(nodes[a])].append(self.slot_of[a])
        self.scratch = [np.empty(max(largest, 1), dtype=d) for d in self.scratch_dtypes]

    def _uniform_values(self, lr: float, step: int) -> dict[int, Any]:
        """Every uniform node's value this step, as a numpy scalar of its kind."""
        t = self.trace
        inputs = {"lr": np.float32(lr), **self.rule.step_values(self.hyper, np.float32(step), FLOAT32_OPS)}
        values: dict[int, Any] = {}
        for i in self.order:
            node = t.nodes[i]
            kind = self._dtype_of(node).type
            if node.op == "input" and node.uniform:
                values[i] = kind(inputs[node.name])
            elif node.op == "slot":
                values[i] = kind(np.float32(t.slots[node.slot]))
            elif node.uniform and node.op == "cast":
                values[i] = kind(values[node.args[0]])
            elif node.uniform:
                values[i] = kind(_UFUNCS[node.op](*(values[a] for a in node.args)))
        return values

    def step(self, arrays: Sequence[dict[str, np.ndarray]], lr: float, step: int) -> None:
        """One step over every leaf: ``arrays`` holds each leaf's ``{"w", "g", state name: array}``, updated in
        place; ``step`` counts from 1."""
        uniform = self._uniform_values(lr, step)
        nodes = self.trace.nodes
        for leaf in arrays:
            n = leaf["w"].size
            value: dict[int, Any] = dict(uniform)
            for i in self.order:
                node = nodes[i]
                if i in value:
                    continue
                if node.op == "input":
                    value[i] = leaf[node.name].reshape(-1)
                    continue
                out = leaf[self.direct[i]].reshape(-1) if i in self.direct else self.scratch[self.slot_of[i]][:n]
                args = [value[a] for a in node.args]
                if node.op == "cast":
                    np.copyto(out, args[0], casting="unsafe")
                else:
                    _UFUNCS[node.op](*args, out=out, casting="unsafe")
                value[i] = out
            for name, i in self.copies:
                np.copyto(leaf[name].reshape(-1), value[i])
