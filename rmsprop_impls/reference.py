"""A float64 NumPy reference of RMSprop, for tests and the selftest to compare against, and how far each dtype
may drift from it."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .formula import DEFAULT_ALPHA, DEFAULT_EPS, check_hyperparameters


def reference_step(
    w: np.ndarray, g: np.ndarray, v: np.ndarray, lr: float, alpha: float, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """One RMSprop step in float64; returns ``(new_w, new_v)``."""
    w, g, v = (np.asarray(x, dtype=np.float64) for x in (w, g, v))
    v = alpha * v + (1.0 - alpha) * g * g
    return w - lr * g / (np.sqrt(v) + eps), v


def reference_trajectory(
    w0: np.ndarray,
    grads: list[np.ndarray],
    learning_rate: float | Callable[[int], float],
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Run one step per gradient from ``w0`` and ``v = 0``; returns the final ``(w, v)``.

    A schedule is called with the step count before the update (0, 1, ...),
    as MLX's optimizers call theirs.
    """
    check_hyperparameters(alpha, eps)
    w = np.asarray(w0, dtype=np.float64)
    v = np.zeros_like(w)
    for step, g in enumerate(grads):
        lr = float(learning_rate(step)) if callable(learning_rate) else float(learning_rate)
        w, v = reference_step(w, g, v, lr, alpha, eps)
    return w, v


#: Per-step rounding of each dtype, relative to 1 + |w|. Rounding errors add up
#: like a random walk (the gradients do not depend on w), so the tolerance after
#: n steps is this times sqrt(n): float32 1e-5 after 100 steps, float16 1e-2,
#: bfloat16 1e-1 (it keeps 8 bits of mantissa).
ROUNDING = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 1e-2}


def tolerance(dtype: mx.Dtype, steps: int, largest_step: float = 1.0) -> float:
    """The rounding bound after ``steps``; a step larger than 1 + |w| rounds in proportion to its size."""
    return ROUNDING[dtype] * math.sqrt(steps) * max(1.0, largest_step)


def largest_step(learning_rate, alpha: float) -> float:
    """A bound on |lr*g/(sqrt(v)+eps)|: v >= (1-alpha)*g^2, and schedules here start at their largest."""
    lr = float(learning_rate(mx.array(0))) if callable(learning_rate) else learning_rate
    return abs(lr) / math.sqrt(max(1.0 - alpha, 1e-12))
