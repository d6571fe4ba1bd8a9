"""A hand-written Metal kernel (``mx.fast.metal_kernel``): w and v stay packed, gradients are read in place.

The kernel, its geometry and its dispatch live in :mod:`rmsprop_impls.kernels.gpu_kernels`,
shared with ``cuda_kernel``.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.gpu_kernels import METAL, GpuKernelRMSprop


class MetalKernelRMSprop(GpuKernelRMSprop):
    name = "metal_kernel"
    summary = "mx.fast.metal_kernel: w and v packed, gradients read in place, 25 leaves per launch"
    device = "gpu"
    backend = METAL

    @classmethod
    def unavailable_reason(cls):
        if not mx.metal.is_available():
            return "needs a Metal GPU (mx.metal.is_available() is False)"
        return None


VARIANT = MetalKernelRMSprop
