"""MLX ops leaf by leaf, as the stock class runs them."""

from __future__ import annotations

from ..optimizer import OptimizerBase, StateLists


class EagerOptimizer(OptimizerBase):
    name = "eager"
    summary = "MLX ops per leaf, like stock"
    device = "default"

    def update_leaves(self, w, g, s, scalars):
        return update_each_leaf(self.rule, self.hyper, w, g, s, scalars.lr, scalars.values)


def update_each_leaf(rule, hyper, w, g, s, lr, values) -> tuple[list, StateLists]:
    """The rule's MLX ops on each leaf in turn: ``(new w's, {changed state: new arrays})``."""
    new_w, new_s = [], {}
    for i, (wi, gi) in enumerate(zip(w, g)):
        nw, changed = rule.update(hyper, wi, gi, {name: x[i] for name, x in s.items()}, lr, values)
        new_w.append(nw)
        for name, x in changed.items():
            new_s.setdefault(name, []).append(x)
    return new_w, new_s


VARIANT = EagerOptimizer
