"""From a rule's traced update (:class:`~.element.Trace`) to source text, for any target language.

A generator (the C++ kernel's, the Metal and CUDA kernels', the C++ MLX-ops
formula's) supplies only how its language spells one node, given the names of
the node's arguments; :func:`emit` walks the live nodes in order, names each,
and splits the lines that are the same for every element (the ``uniform``
ones: slots, the learning rate, per-step inputs and what is computed from them
only), which a kernel computes once per launch, from the per-element ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .element import Node, Trace

Spell = Callable[[Node, list[str]], str]


@dataclass
class Emitted:
    """Source lines for one trace: ``uniform`` once per launch, then ``per_element`` for each element, and the
    name holding each result (``"w"`` and every changed state)."""

    uniform: list[str] = field(default_factory=list)
    per_element: list[str] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    #: The inputs the results read, by name (a state neither read nor written is not loaded).
    inputs: list[str] = field(default_factory=list)


def live_nodes(trace: Trace) -> list[int]:
    """The nodes the results depend on, in trace order."""
    live, stack = set(), [trace.w_out, *trace.state_out.values()]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(trace.nodes[i].args)
    return sorted(live)


def emit(
    trace: Trace,
    spell: Spell,
    declare: str = "const float {name} = {expr};",
    input_name: Callable[[Node], str] = lambda node: node.name,
    prefix: str = "t",
) -> Emitted:
    """Lines that compute ``trace``'s results: ``declare`` formatted with each node's ``name`` and its
    ``spell(node, argument names)``; an input is referred to by ``input_name(node)`` and declares nothing."""
    out = Emitted()
    names: dict[int, str] = {}
    for i in live_nodes(trace):
        node = trace.nodes[i]
        if node.op == "input":
            names[i] = input_name(node)
            out.inputs.append(node.name)
            continue
        names[i] = f"{prefix}{i}"
        line = declare.format(name=names[i], expr=spell(node, [names[a] for a in node.args]))
        (out.uniform if node.uniform else out.per_element).append(line)
    out.results = {"w": names[trace.w_out], **{k: names[i] for k, i in trace.state_out.items()}}
    return out
