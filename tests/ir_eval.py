"""Evaluate a rule's traced update (:class:`~rmsprop_impls.rules.element.Trace`) node by node with MLX ops,
each node in the dtype its kind names, as a generated kernel computes it.

This is the tests' second reading of the IR: the kernels are generated from the nodes, so if evaluating the
nodes in their declared kinds (``T``: the leaf's dtype; ``float32``) gives stock's bits, a kernel that spells
each node faithfully does too. Nothing here relies on MLX's weak-scalar promotion: every operand is cast to
its node's dtype explicitly, and a slot is passed as float32 and then rounded to ``T``, as the kernels get it.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx

from rmsprop_impls.rules.codegen import live_nodes
from rmsprop_impls.rules.element import F32, Trace

UNARY = {"sqrt": mx.sqrt, "square": mx.square, "abs": mx.abs, "sign": mx.sign}
BINARY = {"add": mx.add, "sub": mx.subtract, "mul": mx.multiply, "div": mx.divide, "maximum": mx.maximum}


def evaluate(trace: Trace, inputs: Mapping[str, mx.array], dtype: mx.Dtype) -> tuple[mx.array, dict[str, mx.array]]:
    """``(new w, changed states)`` of ``trace`` on ``inputs`` (w, g, the states in ``dtype``; lr and the per-step
    inputs as float32 arrays), computing only the nodes the results depend on."""
    kind_dtype = {F32: mx.float32}
    values: dict[int, mx.array] = {}
    for i in live_nodes(trace):  # as a kernel does: a per-step input that no result reads is not passed
        node = trace.nodes[i]
        want = kind_dtype.get(node.kind, dtype)
        if node.op == "input":
            value = inputs[node.name]
        elif node.op == "slot":
            value = mx.array(trace.slots[node.slot], dtype=mx.float32).astype(want)
        elif node.op == "cast":
            value = values[node.args[0]].astype(dtype)
        elif node.op in UNARY:
            value = UNARY[node.op](values[node.args[0]].astype(want))
        else:
            a, b = (values[i].astype(want) for i in node.args)
            value = BINARY[node.op](a, b)
        if value.dtype != want:
            raise AssertionError(f"node {node} evaluated to {value.dtype}, its kind says {want}")
        values[i] = value
    return values[trace.w_out], {name: values[i] for name, i in trace.state_out.items()}
