"""Adam: ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g^2``; ``w = w - lr*m/(sqrt(v)+eps)``.

With ``bias_correction``: ``w = w - c1*m/(sqrt(v)*c2 + eps)``, ``c1 = lr/(1-b1^t)`` and ``c2 = 1/sqrt(1-b2^t)``
at step ``t`` (from 1), computed as stock computes them: ``1-b1^t`` and ``rsqrt(1-b2^t)`` in float32 once per
step (:meth:`Adam.step_values`), ``c1`` and ``c2`` then cast to the leaf's dtype.
"""

from __future__ import annotations

import mlx.optimizers as optim

from . import element
from .base import Rule


def adam_update(e, h, x, w):
    """Adam's update of ``w`` (AdamW passes it decayed): shared by Adam and AdamW, as in stock."""
    lr = e.cast(x.lr, x.g)
    b1, b2 = h.betas
    m = b1 * x.m + (1 - b1) * x.g
    v = b2 * x.v + (1 - b2) * e.square(x.g)
    if h.bias_correction:
        c1 = e.cast(lr / x.bias1, x.g)
        c2 = e.cast(x.rsqrt_bias2, x.g)
        return w - c1 * m / (e.sqrt(v) * c2 + h.eps), {"m": m, "v": v}
    return w - lr * m / (e.sqrt(v) + h.eps), {"m": m, "v": v}


def bias_corrections(hyper, step, e) -> dict:
    """``1 - b1^t`` and ``rsqrt(1 - b2^t)``, as stock computes them (with the step as a uint64 array)."""
    if not hyper["bias_correction"]:
        return {}
    b1, b2 = hyper["betas"]
    return {"bias1": 1 - b1**step, "rsqrt_bias2": e.rsqrt(1 - b2**step)}


class Adam(Rule):
    name = "adam"
    stock = optim.Adam
    states = ("m", "v")
    step_inputs = ("bias1", "rsqrt_bias2")

    def uses_step(self, hyper):
        return bool(hyper["bias_correction"])

    def step_values(self, hyper, step, e=element.MLX_OPS):
        return bias_corrections(hyper, step, e)

    def element(self, e, h, x):
        return adam_update(e, h, x, x.w)

    def configurations(self):
        return [{**self.defaults, "bias_correction": b} for b in (False, True)]


RULE = Adam()
