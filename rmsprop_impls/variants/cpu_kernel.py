"""A C++ MLX primitive: one fused, multi-tensor, threaded step over many leaves.

One graph node updates up to eight leaves (MLX's multi-output nodes cost the
square of their output count in references), so a step costs one MLX task per
eight leaves instead of five ops per leaf. Each task splits its elements over a
persistent thread pool (MLX's CPU back-end has none of its own) and streams
w, g and v once, in float32, with AVX2 where the CPU has it. Outputs reuse the
buffers of inputs nobody else holds (MLX's donation), so a training loop that
drops its old parameters allocates nothing per step and updates in place.
"""

from __future__ import annotations

import os

from ..optimizer import RMSpropBase
from ..registry import VariantUnavailableError


class CpuKernelRMSprop(RMSpropBase):
    """Args (beyond RMSprop's): ``threads``, how many threads share a step (default: every core)."""

    name = "cpu_kernel"
    summary = "C++ primitive: fused, one node per 8 leaves, threaded"

    def __init__(self, learning_rate, alpha=0.99, eps=1e-8, threads: int | None = None):
        super().__init__(learning_rate, alpha, eps)
        if threads is None:
            threads = os.cpu_count() or 1
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, not {threads!r}")
        reason = self.unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(self.name, reason)
        from .. import _cpu_ext

        self.threads = threads
        self._update = _cpu_ext.rmsprop_update

    @classmethod
    def unavailable_reason(cls):
        try:
            from .. import _cpu_ext  # noqa: F401
        except ImportError as e:
            return (
                f"the C++ extension rmsprop_impls._cpu_ext does not load ({e}); reinstall with a C++ compiler "
                "and without RMSPROP_BENCH_NO_EXTENSION=1"
            )
        return None

    def update_leaves(self, w, g, v, lr):
        return self._update(w, g, v, lr, self.alpha, self.eps, self.threads)


VARIANT = CpuKernelRMSprop
