"""Walk a gradient tree against its parameters and optimizer state.

The walk is the one place that checks a tree, so every variant reports a bad
tree the same way: with the path of the first leaf that is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx


class TreeMismatchError(ValueError):
    """Gradients, parameters or state disagree; the message names the path."""

    def __init__(self, path: tuple, problem: str):
        self.path = format_path(path)
        super().__init__(f"at '{self.path}': {problem}")


def format_path(path: tuple) -> str:
    """``("layers", 0, "weight")`` -> ``layers.0.weight``; the root is ``<root>``."""
    return ".".join(str(p) for p in path) if path else "<root>"


def _kind(x: Any) -> str:
    if isinstance(x, mx.array):
        return f"array {x.dtype} {tuple(x.shape)}"
    return type(x).__name__


class MatchedLeaves:
    """The leaves of one step, in tree order, as parallel lists."""

    __slots__ = ("gradients", "parameters", "states", "state_names", "_required", "_tree")

    def __init__(self, tree: Any, state_names: tuple[str, ...] = ("v",)):
        self._tree = tree
        #: The rule's state arrays, which every leaf's state dict must hold.
        self.state_names = state_names
        self._required = frozenset(state_names)
        self.gradients: list[mx.array] = []
        self.parameters: list[mx.array] = []
        self.states: list[dict] = []

    def rebuild(self, leaves: list[mx.array]) -> Any:
        """A tree shaped like the gradients, holding ``leaves`` in order."""
        return _rebuild(self._tree, iter(leaves))


def _rebuild(node: Any, leaves: Iterator[mx.array]) -> Any:
    if isinstance(node, dict):
        return {k: _rebuild(v, leaves) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_rebuild(v, leaves) for v in node]
        return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)  # a namedtuple, as tree_map
    return next(leaves)


def match_leaves(
    gradients: Any, parameters: Any, state: Any = None, state_names: tuple[str, ...] = ("v",)
) -> MatchedLeaves:
    """Pair each gradient leaf with its parameter (and state entry, if given).

    Parameters may hold more than the gradients, as in stock MLX. Raises
    :class:`TreeMismatchError` at the first leaf that is missing, is not an
    array, or differs in shape (dtypes may differ: stock promotes them).
    """
    out = MatchedLeaves(gradients, state_names)
    _walk(gradients, parameters, state, (), out)
    return out


_MISSING = object()


def _check_leaf(g: Any, w: Any, s: Any, path: tuple, out: MatchedLeaves) -> None:
    # This runs once per leaf on every step: keep it to the checks that matter.
    if type(w) is not mx.array and not isinstance(w, mx.array):
        raise TreeMismatchError(path, f"gradient is an array but the parameter is {_kind(w)}")
    if g.shape != w.shape:
        raise TreeMismatchError(path, f"gradient is {_kind(g)} but the parameter is {_kind(w)}")
    out.gradients.append(g)
    out.parameters.append(w)
    if s is not None:
        missing = [name for name in out.state_names if not isinstance(s, dict) or name not in s]
        if missing:
            raise TreeMismatchError(path, f"the optimizer state has no {', '.join(map(repr, missing))} for this leaf")
        out.states.append(s)


def _walk(g: Any, w: Any, s: Any, path: tuple, out: MatchedLeaves) -> None:
    if isinstance(g, mx.array):
        _check_leaf(g, w, s, path, out)
    elif isinstance(g, (dict, list, tuple)) and not g:
        return  # no leaves: stock maps over the gradients and never looks at the parameter (mlx-lm's layer_types)
    elif isinstance(g, dict):
        if not isinstance(w, dict):
            raise TreeMismatchError(path, f"gradient is a dict but the parameter is {_kind(w)}")
        if s is not None and not isinstance(s, dict):
            raise TreeMismatchError(path, "the optimizer state does not match this dict")
        gradients, parameters, states, required = out.gradients, out.parameters, out.states, out._required
        for k, gk in g.items():
            wk = w.get(k, _MISSING)
            sk = None if s is None else s.get(k, _MISSING)
            if (
                type(gk) is mx.array
                and type(wk) is mx.array
                and type(sk) is dict
                and required <= sk.keys()
                and gk.shape == wk.shape
            ):
                # The common leaf, checked inline: this loop runs for every leaf on every step.
                gradients.append(gk)
                parameters.append(wk)
                states.append(sk)
                continue
            if wk is _MISSING:
                raise TreeMismatchError(path + (k,), "present in the gradients, missing in the parameters")
            if sk is _MISSING:
                raise TreeMismatchError(path + (k,), "missing in the optimizer state")
            _walk(gk, wk, sk, path + (k,), out)
    elif isinstance(g, (list, tuple)):
        if not isinstance(w, (list, tuple)) or len(w) != len(g):
            raise TreeMismatchError(
                path,
                f"gradient is a {type(g).__name__} of {len(g)} but the parameter is {_kind(w)}"
                + (f" of {len(w)}" if isinstance(w, (list, tuple)) else ""),
            )
        if s is not None and (not isinstance(s, (list, tuple)) or len(s) != len(g)):
            raise TreeMismatchError(path, "the optimizer state does not match this list")
        for i, gi in enumerate(g):
            _walk(gi, w[i], None if s is None else s[i], path + (i,), out)
    else:
        raise TreeMismatchError(path, f"gradient leaf is a {type(g).__name__}, not an mx.array")
