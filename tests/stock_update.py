"""Stock RMSprop's update of one array in MLX ops, for tests that call the C++ kernel's functions directly."""

from __future__ import annotations

import mlx.core as mx

from rmsprop_impls.rules import rule


def rmsprop_update(w: mx.array, g: mx.array, v: mx.array, lr: mx.array, alpha: float, eps: float):
    """``(new_w, new_v)`` as ``mlx.optimizers.RMSprop`` computes them."""
    new_w, states = rule("rmsprop").update({"alpha": alpha, "eps": eps}, w, g, {"v": v}, lr, {})
    return new_w, states["v"]
