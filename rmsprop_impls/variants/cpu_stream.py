"""The eager update placed on the ``mx.cpu`` stream.

On Apple silicon this is the CPU side of a CPU-vs-GPU comparison; on a
CPU-only MLX it runs on the default device's stream and costs the same as
``eager``.
"""

from __future__ import annotations

import mlx.core as mx

from .eager import EagerOptimizer


class CpuStreamOptimizer(EagerOptimizer):
    name = "cpu_stream"
    summary = "eager MLX ops on the mx.cpu stream"
    device = "cpu"

    def update_leaves(self, w, g, s, scalars):
        with mx.stream(mx.cpu):
            return super().update_leaves(w, g, s, scalars)


VARIANT = CpuStreamOptimizer
