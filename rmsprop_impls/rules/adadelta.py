"""AdaDelta: ``v = rho*v + (1-rho)*g^2``; ``d = sqrt(u+eps)/sqrt(v+eps)*g``; ``u = rho*u + (1-rho)*d^2``;
``w = w - lr*d``."""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class AdaDelta(Rule):
    name = "adadelta"
    stock = optim.AdaDelta
    states = ("v", "u")

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        v = h.rho * x.v + (1 - h.rho) * e.square(x.g)
        d = e.sqrt(x.u + h.eps) / e.sqrt(v + h.eps) * x.g
        u = h.rho * x.u + (1 - h.rho) * e.square(d)
        return x.w - lr * d, {"v": v, "u": u}


RULE = AdaDelta()
