"""Multi-tensor updates, like PyTorch's foreach: one MLX update per dtype buffer.

The packing and pre-packed gradients live in
:class:`~rmsprop_impls.kernels.multi_tensor.PackedOptimizer`; this variant runs
stock's MLX ops on each buffer.
"""

from __future__ import annotations

from ..kernels.multi_tensor import PackedOptimizer


class FlatOptimizer(PackedOptimizer):
    name = "flat"
    summary = "one MLX update per dtype over packed buffers"
    device = "default"

    def update_buffers(self, w, g, s, scalars):
        return self.rule.update(self.hyper, w, g, s, scalars.lr, scalars.values)


VARIANT = FlatOptimizer
