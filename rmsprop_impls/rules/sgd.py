"""SGD with momentum, dampening, Nesterov and weight decay (L2, added to the gradient).

``g += weight_decay*w``; ``v = momentum*v + (1-dampening)*g``; ``w = w - lr*(g + momentum*v if nesterov else v)``;
with no momentum ``w = w - lr*g`` and ``v`` is never read or written.
"""

from __future__ import annotations

import mlx.optimizers as optim

from .base import Rule


class SGD(Rule):
    name = "sgd"
    stock = optim.SGD
    states = ("v",)

    def element(self, e, h, x):
        g = x.g
        if h.weight_decay != 0:
            g = g + h.weight_decay * x.w
        lr = e.cast(x.lr, g)
        if h.momentum <= 0:
            return x.w - lr * g, {}
        v = h.momentum * x.v
        v = v + (1 - h.dampening) * g if h.dampening > 0 else v + g
        update = g + h.momentum * v if h.nesterov else v
        return x.w - lr * update, {"v": v}

    def configurations(self):
        plain = [{"weight_decay": wd} for wd in (0.0, 1e-4)]
        momentum = [
            {"momentum": 0.9, "weight_decay": wd, "dampening": d, "nesterov": n}
            for wd in (0.0, 1e-4)
            for d, n in ((0.0, False), (0.1, False), (0.0, True))
        ]
        return [{**self.defaults, **c} for c in plain + momentum]


RULE = SGD()
