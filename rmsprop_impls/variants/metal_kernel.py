"""A hand-written Metal kernel (``mx.fast.metal_kernel``): one fused launch per dtype buffer.

The kernel, its geometry and its dispatch live in :mod:`rmsprop_impls.gpu_kernels`,
shared with ``cuda_kernel``.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.gpu_kernels import METAL, GpuKernelRMSprop


class MetalKernelRMSprop(GpuKernelRMSprop):
    name = "metal_kernel"
    summary = "mx.fast.metal_kernel: one fused launch per dtype buffer"
    device = "gpu"
    backend = METAL

    @classmethod
    def unavailable_reason(cls):
        if not mx.metal.is_available():
            return "needs a Metal GPU (mx.metal.is_available() is False)"
        return None


VARIANT = MetalKernelRMSprop
