"""MLX ops leaf by leaf, as stock ``mlx.optimizers.RMSprop`` runs them."""

from __future__ import annotations

from ..formula import rmsprop_update
from ..optimizer import RMSpropBase


class EagerRMSprop(RMSpropBase):
    name = "eager"
    summary = "MLX ops per leaf, like stock"
    device = "default"

    def update_leaves(self, w, g, v, lr):
        pairs = [rmsprop_update(wi, gi, vi, lr, self.alpha, self.eps) for wi, gi, vi in zip(w, g, v)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


VARIANT = EagerRMSprop
