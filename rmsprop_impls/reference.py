"""A float64 NumPy reference of RMSprop, for tests and benchmarks to compare against."""

from __future__ import annotations

from collections.abc import Callable

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
