"""What the Metal and CUDA kernel variants share: the kernel body, its launch geometry and its dispatch.

Both run one fused launch per dtype buffer of the multi-tensor layout
(:class:`~rmsprop_impls.multi_tensor.PackedRMSprop`), so a tree of any leaf
count costs as many launches as it has dtypes. Each thread updates one
element, in float32 whatever the storage dtype. The learning rate, ``alpha``,
``1 - alpha`` and ``eps`` reach the kernel as one float32 input array, not as
template values: every distinct template value compiles a new kernel, and a
schedule changes the learning rate every step. The only template value is the
storage dtype ``T``, so each kernel object compiles at most three kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..registry import VariantUnavailableError
from .multi_tensor import PackedRMSprop

#: Threads per threadgroup (Metal) or block (CUDA): a multiple of both warp sizes, under both limits.
THREADS_PER_GROUP = 256
#: MLX takes the grid as 32-bit ints, and a 1-D MLX array holds at most this many elements anyway.
MAX_GRID = 2**31 - 1
INPUT_NAMES = ("w", "g", "v", "hyper")
OUTPUT_NAMES = ("w_new", "v_new")
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Backend:
    """How one GPU language spells the few things the kernel body needs."""

    name: str
    factory: str  # the mx.fast function that builds the kernel object
    index: str  # this thread's element, and the bounds check against the buffer's size
    sqrt: str  # correctly rounded, as stock's ops are
    divide: str  # format string, correctly rounded
    to_float: str  # format strings for the casts to and from the storage type T
    from_float: str


METAL = Backend(
    name="metal",
    factory="metal_kernel",
    index="const uint i = thread_position_in_grid.x;\nif (i >= uint(w_shape[0])) return;",
    sqrt="metal::precise::sqrt",
    divide="metal::precise::divide({}, {})",
    to_float="float({})",
    from_float="T({})",
)
# CUDA rounds the grid up to whole blocks, so the last block's spare threads must stop here.
# NVRTC's defaults (no fast math) already round sqrtf and / correctly.
CUDA = Backend(
    name="cuda",
    factory="cuda_kernel",
    index=(
        "const unsigned long long i = cooperative_groups::this_grid().thread_rank();\n"
        "if (i >= static_cast<unsigned long long>(w_shape[0])) return;"
    ),
    sqrt="sqrtf",
    divide="({}) / ({})",
    to_float="static_cast<float>({})",
    from_float="static_cast<T>({})",
)


def kernel_source(backend: Backend) -> str:
    """The kernel body (MLX generates the signature): stock's update for element ``i``, in float32."""
    f, t = backend.to_float.format, backend.from_float.format
    step = backend.divide.format("lr * g_i", f"{backend.sqrt}(v_i) + eps")
    new_w = f"{f('w[i]')} - {step}"
    return "\n".join(
        [
            backend.index,
            "const float lr = hyper[0], alpha = hyper[1], one_minus_alpha = hyper[2], eps = hyper[3];",
            f"const float g_i = {f('g[i]')};",
            f"const float v_i = alpha * {f('v[i]')} + one_minus_alpha * (g_i * g_i);",
            f"v_new[i] = {t('v_i')};",
            f"w_new[i] = {t(new_w)};",
            "",
        ]
    )


@dataclass(frozen=True)
class LaunchGeometry:
    grid: tuple[int, int, int]  # threads in all, as MLX counts the grid on both back-ends
    threadgroup: tuple[int, int, int]


def launch_geometry(n_elements: int, threads_per_group: int = THREADS_PER_GROUP) -> LaunchGeometry:
    """One thread per element, in groups of ``threads_per_group`` (fewer for a smaller buffer)."""
    if not 1 <= n_elements <= MAX_GRID:
        raise ValueError(f"a launch covers 1 to {MAX_GRID} elements, not {n_elements}")
    return LaunchGeometry((n_elements, 1, 1), (min(n_elements, threads_per_group), 1, 1))


@functools.cache
def shared_kernel(backend: Backend) -> Any:
    """The kernel object, built once per process and back-end, then reused by every optimizer."""
    make = getattr(mx.fast, backend.factory)
    return make(
        name="rmsprop_step",
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        source=kernel_source(backend),
    )


def hyperparameters(lr: mx.array, constants: mx.array) -> mx.array:
    """``[lr, alpha, 1 - alpha, eps]`` in float32, from the step's lr and the fixed rest."""
    return mx.concatenate([mx.reshape(lr, (1,)).astype(mx.float32), constants])


def dispatch(
    kernel: Any, w: mx.array, g: mx.array, v: mx.array, hyper: mx.array, stream: Any = mx.gpu
) -> tuple[mx.array, mx.array]:
    """Launch ``kernel`` once over 1-D buffers ``w``, ``g`` and ``v``; returns the new ``(w, v)``."""
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the GPU kernels update float32, float16 and bfloat16, not {w.dtype}")
    if w.size == 0:
        return w, v
    geometry = launch_geometry(w.size)
    w_new, v_new = kernel(
        inputs=[w, g, v, hyper],
        template=[("T", w.dtype)],
        grid=geometry.grid,
        threadgroup=geometry.threadgroup,
        output_shapes=[w.shape, v.shape],
        output_dtypes=[w.dtype, v.dtype],
        stream=stream,
    )
    return w_new, v_new


class GpuKernelRMSprop(PackedRMSprop):
    """A hand-written kernel over the packed buffers; subclasses name the back-end and its availability."""

    backend: Backend

    def __init__(self, learning_rate, alpha=0.99, eps=1e-8):
        reason = self.unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(self.name, reason)
        super().__init__(learning_rate, alpha, eps)
        self._kernel = shared_kernel(self.backend)
        self._constants = mx.array([alpha, 1.0 - alpha, eps], dtype=mx.float32)

    def update_buffers(self, w, g, v, lr):
        return dispatch(self._kernel, w, g, v, hyperparameters(lr, self._constants))
