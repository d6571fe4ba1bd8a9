"""Adagrad: ``v = v + g^2``; ``w = w - lr*g/(sqrt(v)+eps)``."""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class Adagrad(Rule):
    name = "adagrad"
    stock = optim.Adagrad
    states = ("v",)

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        v = x.v + e.square(x.g)
        return x.w - lr * x.g / (e.sqrt(v) + h.eps), {"v": v}


RULE = Adagrad()
