"""RMSprop: ``v = alpha*v + (1-alpha)*g^2``; ``w = w - lr*g/(sqrt(v)+eps)``."""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class RMSprop(Rule):
    name = "rmsprop"
    stock = optim.RMSprop
    states = ("v",)

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        v = h.alpha * x.v + (1 - h.alpha) * e.square(x.g)
        return x.w - lr * x.g / (e.sqrt(v) + h.eps), {"v": v}


RULE = RMSprop()
