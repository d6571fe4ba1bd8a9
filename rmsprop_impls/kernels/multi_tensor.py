"""Multi-tensor updates: one per dtype over packed buffers, like PyTorch's foreach.

Used by ``flat`` (MLX ops on each buffer); the GPU kernels reuse its packed
``w`` and state but read the gradients unpacked. Here gradients are packed
every step, and that copy is part of the timed step, and so are w and the state: the
parameters and state arrays handed back are views into the output buffers, but a
program may change one in place (``p["w"][:] = ...``, ``+=``) without MLX's
Python API showing it, so a buffer handed out is never trusted to still hold
them (issue 21: reusing it gave stale numbers). A trainer that already holds flat
gradients passes :class:`~rmsprop_impls.packing.PackedGradients` and skips that
copy too.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..optimizer import OptimizerBase, StateLists, StepScalars
from .packing import FlatLayout, PackedGradients, pack_group, unpack_group


class PackedOptimizer(OptimizerBase):
    """Runs :meth:`update_buffers` once per dtype over the packed w, g and state arrays."""

    def __init__(self, learning_rate, *hyper, **named):
        super().__init__(learning_rate, *hyper, **named)
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

    def update_leaves(self, w, g, s, scalars):
        layout = self._layout_for(w)
        new_w: list = [None] * len(w)
        read = self.rule.trace(self.hyper).used_inputs()  # plain SGD never reads its v: it is not packed
        new_s: StateLists = {}
        for grp in layout.groups:
            wb = pack_group(grp, [w[i] for i in grp.indices])
            sb = {name: pack_group(grp, [x[i] for i in grp.indices]) for name, x in s.items() if name in read}
            gb = self._packed_g[grp.dtype] if self._packed_g else pack_group(grp, [g[i] for i in grp.indices])
            wb, sb = self.update_buffers(wb, gb, sb, scalars)
            for i, wi in zip(grp.indices, unpack_group(grp, wb)):
                new_w[i] = wi
            for name, buffer in sb.items():
                new_s.setdefault(name, [None] * len(w))
                for i, x in zip(grp.indices, unpack_group(grp, buffer)):
                    new_s[name][i] = x
        return new_w, new_s

    def update_buffers(
        self, w: mx.array, g: mx.array, s: dict[str, mx.array], scalars: StepScalars
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """The new ``w`` and the changed state buffers of one dtype's 1-D buffers."""
        raise NotImplementedError
