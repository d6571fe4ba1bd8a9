"""A float64 NumPy reference of every rule, for tests and the selftest to compare against, and how far each
dtype may drift from it.

The reference runs each rule's own element function (:mod:`rmsprop_impls.rules`) on float64 NumPy arrays, so
there is no second copy of any update to keep in step with the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np

from .rules import DEFAULT_RULE, Rule, rule

#: ``e`` for running an element function on float64 NumPy arrays: no casts, no roundings.
NUMPY_OPS = SimpleNamespace(
    sqrt=np.sqrt,
    rsqrt=lambda x: 1 / np.sqrt(x),
    square=np.square,
    abs=np.abs,
    sign=np.sign,
    maximum=np.maximum,
    cast=lambda x, like: x,
)


def rule_reference_step(
    optimizer: str | Rule,
    hyper: Mapping[str, Any],
    w: np.ndarray,
    g: np.ndarray,
    states: Mapping[str, np.ndarray],
    lr: float,
    step: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step of ``optimizer`` in float64 (``step`` counts from 1); returns ``(new_w, new states)``, every
    state included."""
    r = rule(optimizer)
    w, g = (np.asarray(x, dtype=np.float64) for x in (w, g))
    states = {name: np.asarray(x, dtype=np.float64) for name, x in states.items()}
    step_values = r.step_values(hyper, np.float64(step), NUMPY_OPS)
    x = SimpleNamespace(w=w, g=g, lr=np.float64(lr), **states, **step_values)
    new_w, changed = r.element(NUMPY_OPS, SimpleNamespace(**hyper), x)
    return new_w, {**states, **changed}


def reference_step(
    w: np.ndarray, g: np.ndarray, v: np.ndarray, lr: float, alpha: float, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """One RMSprop step in float64; returns ``(new_w, new_v)``."""
    new_w, states = rule_reference_step("rmsprop", {"alpha": alpha, "eps": eps}, w, g, {"v": v}, lr, 1)
    return new_w, states["v"]


def reference_trajectory(
    w0: np.ndarray,
    grads: list[np.ndarray],
    learning_rate: float | Callable[[int], float],
    *hyper: Any,
    optimizer: str | Rule = DEFAULT_RULE,
    **named: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run one step per gradient from ``w0`` and zero state; returns the final ``(w, states)``.

    A schedule is called with the step count before the update (0, 1, ...),
    as MLX's optimizers call theirs.
    """
    r = rule(optimizer)
    h = r.hyperparameters(*hyper, **named)
    w = np.asarray(w0, dtype=np.float64)
    states = {name: np.zeros_like(w) for name in r.states}
    for step, g in enumerate(grads):
        lr = float(learning_rate(step)) if callable(learning_rate) else float(learning_rate)
        w, states = rule_reference_step(r, h, w, g, states, lr, step + 1)
    return w, states


#: Per-step rounding of each dtype, relative to 1 + |w|. Rounding errors add up
#: like a random walk (the gradients do not depend on w), so the tolerance after
#: n steps is this times sqrt(n): float32 1e-5 after 100 steps, float16 1e-2,
#: bfloat16 1e-1 (it keeps 8 bits of mantissa).
ROUNDING = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 1e-2}


def tolerance(dtype: mx.Dtype, steps: int, largest_step: float = 1.0) -> float:
    """The rounding bound after ``steps``; a step larger than 1 + |w| rounds in proportion to its size."""
    return ROUNDING[dtype] * math.sqrt(steps) * max(1.0, largest_step)


def largest_step(learning_rate, alpha: float) -> float:
    """A bound on RMSprop's |lr*g/(sqrt(v)+eps)|: v >= (1-alpha)*g^2, and schedules here start at their largest."""
    lr = float(learning_rate(mx.array(0))) if callable(learning_rate) else learning_rate
    return abs(lr) / math.sqrt(max(1.0 - alpha, 1e-12))
