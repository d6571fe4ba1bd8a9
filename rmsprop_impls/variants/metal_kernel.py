"""A Metal kernel (``mx.fast.metal_kernel``) generated from the rule: w and the state stay packed, gradients
are read in place.

The kernel source is generated in :mod:`rmsprop_impls.kernels.gpu_source`; its geometry and dispatch live
in :mod:`rmsprop_impls.kernels.gpu_kernels`, shared with ``cuda_kernel``.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.gpu_kernels import METAL, GpuKernelOptimizer
from ..mlx_device import device_info


class MetalKernelOptimizer(GpuKernelOptimizer):
    name = "metal_kernel"
    summary = "mx.fast.metal_kernel generated from the rule: w and state packed, gradients read in place"
    device = "gpu"
    backend = METAL

    @classmethod
    def unavailable_reason(cls):
        if not mx.metal.is_available():
            return "needs a Metal GPU (mx.metal.is_available() is False)"
        return None

    @classmethod
    def max_buffer_bytes(cls) -> int | None:
        """Metal's ``maxBufferLength``: MLX refuses to allocate a larger buffer, and it is under 8 GiB on some Macs."""
        return device_info().get("max_buffer_length")


VARIANT = MetalKernelOptimizer
