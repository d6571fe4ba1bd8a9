"""The RMSprop update, written once.

Every variant that runs MLX ops calls :func:`rmsprop_update`, so they compute
exactly what ``mlx.optimizers.RMSprop`` computes, op for op:

    v = alpha * v + (1 - alpha) * g**2
    w = w - lr * g / (sqrt(v) + eps)
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_ALPHA = 0.99
DEFAULT_EPS = 1e-8


def check_hyperparameters(alpha: float, eps: float) -> None:
    """Reject what stock RMSprop rejects, with the same ``ValueError``."""
    if alpha < 0.0:
        raise ValueError(f"RMSprop alpha should be >=0, {alpha} was provided instead")
    if eps <= 0.0:
        raise ValueError(f"RMSprop epsilon should be >0, {eps} was provided instead")


def rmsprop_update(
    w: mx.array, g: mx.array, v: mx.array, lr: mx.array, alpha: float, eps: float
) -> tuple[mx.array, mx.array]:
    """One step for one array; returns ``(new_w, new_v)``.

    The operation order and the casts match stock RMSprop, so float16 and
    bfloat16 round the same way.
    """
    lr = lr.astype(g.dtype)
    v = alpha * v + (1 - alpha) * mx.square(g)
    return w - lr * g / (mx.sqrt(v) + eps), v
