"""A hand-written CUDA kernel (``mx.fast.cuda_kernel``): w and v stay packed, gradients are read in place.

The kernel, its geometry and its dispatch live in :mod:`rmsprop_impls.kernels.gpu_kernels`,
shared with ``metal_kernel``. It needs MLX's CUDA back-end: ``mlx[cuda12]`` or
``mlx[cuda13]`` on Linux with an NVIDIA GPU.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.gpu_kernels import CUDA, GpuKernelRMSprop


class CudaKernelRMSprop(GpuKernelRMSprop):
    name = "cuda_kernel"
    summary = "mx.fast.cuda_kernel: w and v packed, gradients read in place, 25 leaves per launch"
    device = "gpu"
    backend = CUDA

    @classmethod
    def unavailable_reason(cls):
        cuda = getattr(mx, "cuda", None)
        if cuda is None or not cuda.is_available():
            return (
                "needs MLX's CUDA back-end and an NVIDIA GPU (mx.cuda.is_available() is False; "
                "on Linux install mlx[cuda12] or mlx[cuda13])"
            )
        return None


VARIANT = CudaKernelRMSprop
