"""Pack many leaves into one contiguous buffer per dtype, and back.

Shared by the multi-tensor variants: ``flat`` runs MLX ops once per buffer,
and the GPU kernels keep ``w`` and ``v`` packed, one buffer per launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map


@dataclass(frozen=True)
class DtypeGroup:
    """The leaves of one dtype: their indices in tree order, shapes and offsets."""

    dtype: mx.Dtype
    indices: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start of each leaf; the last entry is the total size

    @property
    def size(self) -> int:
        return self.offsets[-1]


class FlatLayout:
    """Where each leaf of a list lives inside its dtype's buffer."""

    def __init__(self, leaves: list[mx.array]):
        by_dtype: dict[mx.Dtype, list[int]] = {}
        for i, x in enumerate(leaves):
            by_dtype.setdefault(x.dtype, []).append(i)
        self.n_leaves = len(leaves)
        self.groups: list[DtypeGroup] = []
        for dtype, idx in by_dtype.items():
            offsets = [0]
            for i in idx:
                offsets.append(offsets[-1] + leaves[i].size)
            shapes = tuple(tuple(leaves[i].shape) for i in idx)
            self.groups.append(DtypeGroup(dtype, tuple(idx), shapes, tuple(offsets)))

    @staticmethod
    def signature(leaves: list[mx.array]) -> tuple:
        """What a layout depends on: each leaf's shape and dtype."""
        return tuple((tuple(x.shape), x.dtype) for x in leaves)

    def pack(self, leaves: list[mx.array]) -> dict[mx.Dtype, mx.array]:
        """One 1-D buffer per dtype, the leaves concatenated in tree order."""
        return {grp.dtype: pack_group(grp, [leaves[i] for i in grp.indices]) for grp in self.groups}

    def unpack(self, buffers: dict[mx.Dtype, mx.array]) -> list[mx.array]:
        """The leaves as views into the buffers, in the order they were packed."""
        out: list[Any] = [None] * self.n_leaves
        for grp in self.groups:
            for i, leaf in zip(grp.indices, unpack_group(grp, buffers[grp.dtype])):
                out[i] = leaf
        return out


def pack_group(group: DtypeGroup, leaves: list[mx.array]) -> mx.array:
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return mx.concatenate([x.reshape(-1) for x in leaves])


def unpack_group(group: DtypeGroup, buffer: mx.array) -> list[mx.array]:
    if len(group.shapes) == 1:
        return [buffer.reshape(group.shapes[0])]
    parts = mx.split(buffer, list(group.offsets[1:-1]))
    return [p.reshape(s) for p, s in zip(parts, group.shapes)]


class PackedGradients:
    """Gradients that a trainer already holds as one buffer per dtype.

    Pass one to a multi-tensor variant's ``apply_gradients`` (``flat``, the GPU
    kernels) in place of a gradient tree to skip the per-step packing:
    ``PackedGradients.pack(grads)`` builds one from a tree, and
    ``PackedGradients(tree_like, buffers)`` wraps buffers a trainer made.
    """

    def __init__(self, tree_like: Any, buffers: dict[mx.Dtype, mx.array]):
        leaves = [x for _, x in tree_flatten(tree_like)]
        self.layout = FlatLayout(leaves)
        for grp in self.layout.groups:
            buf = buffers.get(grp.dtype)
            if buf is None or buf.ndim != 1 or buf.size != grp.size:
                got = "none" if buf is None else f"shape {tuple(buf.shape)}"
                raise ValueError(f"packed {grp.dtype} gradients need a 1-D buffer of {grp.size} elements, got {got}")
        self.buffers = buffers
        self._tree_like = tree_like

    @classmethod
    def pack(cls, gradients: Any) -> PackedGradients:
        leaves = [x for _, x in tree_flatten(gradients)]
        return cls(gradients, FlatLayout(leaves).pack(leaves))

    def tree(self) -> Any:
        """The gradients as a tree of views, for checking against the parameters."""
        leaves = iter(self.layout.unpack(self.buffers))
        return tree_map(lambda _: next(leaves), self._tree_like)
