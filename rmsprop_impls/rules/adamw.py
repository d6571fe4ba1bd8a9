"""AdamW: Adam's update of ``w*(1 - lr*weight_decay)`` (decoupled weight decay), as stock's AdamW."""

from __future__ import annotations

import mlx.optimizers as optim

from .adam import Adam, adam_update


class AdamW(Adam):
    name = "adamw"
    stock = optim.AdamW

    def element(self, e, h, x):
        lr = e.cast(x.lr, x.g)
        return adam_update(e, h, x, x.w * (1 - lr * h.weight_decay))


RULE = AdamW()
