"""Adamax: ``m = b1*m + (1-b1)*g``; ``v = max(b2*v, |g|)``; ``w = w - lr*m/(v+eps)``."""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class Adamax(Rule):
    name = "adamax"
    stock = optim.Adamax
    states = ("m", "v")

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        b1, b2 = h.betas
        m = b1 * x.m + (1 - b1) * x.g
        v = e.maximum(b2 * x.v, e.abs(x.g))
        return x.w - lr * m / (v + h.eps), {"m": m, "v": v}


RULE = Adamax()
