"""A CUDA kernel (``mx.fast.cuda_kernel``) generated from the rule: w and the state stay packed, gradients
are read in place.

The kernel source is generated in :mod:`rmsprop_impls.kernels.gpu_source`; its geometry and dispatch live
in :mod:`rmsprop_impls.kernels.gpu_kernels`, shared with ``metal_kernel``. It needs MLX's CUDA back-end:
``mlx[cuda12]`` or ``mlx[cuda13]`` on Linux with an NVIDIA GPU.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.gpu_kernels import CUDA, GpuKernelOptimizer
from ..mlx_packages import libmlx_backends


class CudaKernelOptimizer(GpuKernelOptimizer):
    name = "cuda_kernel"
    summary = "mx.fast.cuda_kernel generated from the rule: w and state packed, gradients read in place"
    device = "gpu"
    backend = CUDA

    @classmethod
    def unavailable_reason(cls):
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and cuda.is_available():
            return None
        installed, owner = libmlx_backends()
        cuda_installed = [name for name in installed if name.startswith("mlx-cuda")]
        if cuda_installed and owner is not None and owner not in cuda_installed:
            return (
                f"{cuda_installed[0]} is installed, but its libmlx.so was replaced by {owner}'s (every MLX back-end "
                f"ships that file, and pip does not warn): pip uninstall -y {owner} && pip install --force-reinstall "
                f"--no-deps {cuda_installed[0]}"
            )
        if cuda_installed:
            return f"needs an NVIDIA GPU: {cuda_installed[0]} is installed, and mx.cuda.is_available() is False"
        return (
            "needs MLX's CUDA back-end and an NVIDIA GPU (mx.cuda.is_available() is False; "
            "on Linux install mlx[cuda12] or mlx[cuda13])"
        )


VARIANT = CudaKernelOptimizer
