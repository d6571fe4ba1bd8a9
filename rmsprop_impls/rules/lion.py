"""Lion: ``c = b1*m + (1-b1)*g``; ``m = b2*m + (1-b2)*g``; ``w = (1 - lr*wd)*w`` (if ``wd > 0``);
``w = w - lr*sign(c)``."""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class Lion(Rule):
    name = "lion"
    stock = optim.Lion
    states = ("m",)

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        b1, b2 = h.betas
        c = b1 * x.m + (1 - b1) * x.g
        m = b2 * x.m + (1 - b2) * x.g
        w = x.w
        if h.weight_decay > 0:
            w = (1 - lr * h.weight_decay) * w
        return w - lr * e.sign(c), {"m": m}

    def configurations(self):
        return [{**self.defaults, "weight_decay": wd} for wd in (0.0, 0.1)]


RULE = Lion()
