"""Multi-tensor RMSprop, like PyTorch's foreach: one MLX update per dtype buffer.

The packing, the buffer reuse and pre-packed gradients live in
:class:`~rmsprop_impls.multi_tensor.PackedRMSprop`; this variant runs stock's
MLX ops on each buffer.
"""

from __future__ import annotations

from ..formula import rmsprop_update
from ..kernels.multi_tensor import PackedRMSprop


class FlatRMSprop(PackedRMSprop):
    name = "flat"
    summary = "one MLX update per dtype over packed buffers"
    device = "default"

    def update_buffers(self, w, g, v, lr):
        return rmsprop_update(w, g, v, lr, self.alpha, self.eps)


VARIANT = FlatRMSprop
