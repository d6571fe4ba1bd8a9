"""Multi-tensor RMSprop: one update per dtype over packed buffers, like PyTorch's foreach.

Used by ``flat`` (MLX ops on each buffer); the GPU kernels reuse its packed
``w`` and ``v`` but read the gradients unpacked. Here gradients are packed
every step, and that copy is part of the timed step, and so are w and v: the
parameters and ``v`` handed back are views into the output buffers, but a
program may change one in place (``p["w"][:] = ...``, ``+=``) without MLX's
Python API showing it, so a buffer handed out is never trusted to still hold
them (issue 21: reusing it gave stale numbers). A trainer that already holds flat
gradients passes :class:`~rmsprop_impls.packing.PackedGradients` and skips that
copy too.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..optimizer import RMSpropBase
from .packing import FlatLayout, PackedGradients, pack_group, unpack_group


class PackedRMSprop(RMSpropBase):
    """Runs :meth:`update_buffers` once per dtype over the packed w, g and v."""

    def __init__(self, learning_rate, alpha=0.99, eps=1e-8):
        super().__init__(learning_rate, alpha, eps)
        self._layout: FlatLayout | None = None
        self._layout_signature: tuple | None = None
        self._packed_g: dict | None = None

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        if not isinstance(gradients, PackedGradients):
            return super().apply_gradients(gradients, parameters)
        self._packed_g = gradients.buffers
        try:
            return super().apply_gradients(gradients.tree(), parameters)
        finally:
            self._packed_g = None

    def _layout_for(self, w: list[mx.array]) -> FlatLayout:
        signature = FlatLayout.signature(w)
        if signature != self._layout_signature:
            self._layout, self._layout_signature = FlatLayout(w), signature
        return self._layout

    def update_leaves(self, w, g, v, lr):
        layout = self._layout_for(w)
        new_w: list = [None] * len(w)
        new_v: list = [None] * len(w)
        for grp in layout.groups:
            wb = pack_group(grp, [w[i] for i in grp.indices])
            vb = pack_group(grp, [v[i] for i in grp.indices])
            gb = self._packed_g[grp.dtype] if self._packed_g else pack_group(grp, [g[i] for i in grp.indices])
            wb, vb = self.update_buffers(wb, gb, vb, lr)
            w_views, v_views = unpack_group(grp, wb), unpack_group(grp, vb)
            for i, wi, vi in zip(grp.indices, w_views, v_views):
                new_w[i], new_v[i] = wi, vi
        return new_w, new_v

    def update_buffers(self, w: mx.array, g: mx.array, v: mx.array, lr: mx.array) -> tuple[mx.array, mx.array]:
        """The new ``(w, v)`` of one dtype's 1-D buffers."""
        raise NotImplementedError
