"""What the Metal and CUDA kernel variants share: the kernel body, its launch shape and its dispatch.

**Numbers.** ``precision="stock"`` (the default) gives ``mlx.optimizers.RMSprop``'s
numbers on the same device bit for bit in every dtype: lr, ``alpha``, ``1 - alpha`` and ``eps``
are rounded to the storage type ``T`` the way stock rounds them, and each
operation's result is rounded to ``T`` in stock's order
(``v = alpha*v + (1-alpha)*square(g)``, ``w - (lr*g) / (sqrt(v) + eps)``),
each computed as stock's device code computes it:

- Metal, and CUDA's float32: every operation runs in float32 and is rounded
  once to ``T``; float32 has more than twice the bits of float16 and bfloat16
  plus two, so that gives the correctly rounded result, which is what MLX
  computes there.
- CUDA's float16 and bfloat16: MLX's CUDA ``Sqrt`` is ``cuda::std::sqrt``, which
  is ``hsqrt`` for both (``sqrt.approx.ftz.f32``, resp. ``sqrt.approx.f32``, then
  rounded to ``T``), and its ``Divide`` is ``x / y``, which is ``__hdiv``
  (float16: ``rcp.approx.ftz.f32`` times the dividend, corrected only for tiny
  results; bfloat16: ``div.approx.f32``). Neither is correctly rounded, so a
  correctly rounded kernel would differ from stock where the approximation
  crosses a rounding midpoint. The kernel calls the same intrinsics on the
  same ``T`` values (:data:`CUDA_STOCK_HEADER`); add and multiply are
  ``__hadd``/``__hmul``, correctly rounded, as here.

``precision="float32"`` keeps every intermediate in float32 and rounds once,
at the store, with correctly rounded float32 sqrt and divide on both back-ends:
more accurate, not stock's numbers in float16 and bfloat16; the option for
correctly rounded numbers on CUDA.
On CUDA every float operation is spelled with its ``_rn`` intrinsic, which the
compiler never fuses into a multiply-add (NVRTC's default ``--fmad=true``
would), so both modes are deterministic.

**Launch shape.** ``w`` and ``v`` stay packed, one buffer per chunk of leaves
of one dtype, across steps (the parameters and ``v`` handed back are views into
the kernel's outputs). The gradients are *not* packed: each launch takes up to
:data:`MAX_LEAVES_PER_LAUNCH` gradient leaves as separate buffers, and each
thread finds its leaf from an offsets table. A step reads ``w``, ``g``, ``v``
and writes ``w``, ``v``: 20 bytes per float32 parameter, nothing else. Metal
allows 31 buffer arguments; a launch uses 6 plus one per gradient.

Hyper-parameters reach the kernel as one small float32 input array, never as
template values: every distinct template value compiles a new kernel, and a
schedule changes the learning rate every step. The only template value is
``T``; the kernel objects differ by precision and by gradient count, and on
Metal by which inputs MLX passes in ``constant`` memory (under 8 elements):
MLX 0.30 and 0.31 name a Metal kernel without that, so one name would get a
second source, and MLX would free the first one's library while a command
buffer may still use it (fixed in MLX 0.32.0, which puts it in the name too).

**Size limits.** Each launch stays within what MLX can launch: its grid is a
32-bit int on both back-ends, and CUDA rounds it up to whole blocks in int
arithmetic (``(grid + block - 1) / block``), so a CUDA launch covers at most
``2**31 - 256`` elements; on Metal each packed buffer also stays within the
device's ``max_buffer_length`` (MLX refuses a larger buffer), which is under
8 GiB on smaller Macs. :func:`plan_launches` splits runs of leaves at those
limits; one leaf over them is refused with the limit named (its one buffer
could not be launched whole).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..registry import VariantUnavailableError
from .multi_tensor import PackedOptimizer
from .packing import DtypeGroup, FlatLayout, pack_group, unpack_group

#: Threads per threadgroup (Metal) or block (CUDA): a multiple of both warp sizes, under both limits.
THREADS_PER_GROUP = 256
#: MLX takes the grid as 32-bit ints, and a 1-D MLX array holds at most this many elements anyway.
MAX_GRID = 2**31 - 1
#: MLX passes a Metal input of fewer elements in ``constant`` memory, a different signature (its
#: ``max_constant_array_size``).
METAL_CONSTANT_BELOW = 8
#: Metal's limit of 31 buffer arguments, less w, v, hyper, offsets and the two outputs.
MAX_LEAVES_PER_LAUNCH = 25
PRECISIONS = ("stock", "float32")
FIXED_INPUT_NAMES = ("w", "v", "hyper", "offsets")
OUTPUT_NAMES = ("w_new", "v_new")
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Backend:
    """How one GPU language spells the few things the kernel body needs."""

    name: str
    factory: str  # the mx.fast function that builds the kernel object
    index: str  # this thread's element, as an integer expression
    index_type: str
    mul: str  # format strings for float32 operations, each correctly rounded and never fused
    add: str
    sub: str
    sqrt: str
    divide: str
    to_float: str  # format strings for the casts to and from the storage type T
    from_float: str
    whole_blocks: bool  # MLX launches ceil(grid / block) blocks, computed in int (CUDA)
    signature_by_size: bool  # MLX's generated signature depends on each input's size (Metal)
    stock_sqrt: str  # stock's sqrt and divide of T values held in float32, as stock's device code computes them
    stock_divide: str
    header: str = ""  # what the kernel's source needs defined before it


METAL = Backend(
    name="metal",
    factory="metal_kernel",
    index="thread_position_in_grid.x",
    index_type="uint",
    mul="({} * {})",
    add="({} + {})",
    sub="({} - {})",
    sqrt="metal::precise::sqrt({})",
    divide="metal::precise::divide({}, {})",
    to_float="float({})",
    from_float="T({})",
    whole_blocks=False,
    signature_by_size=True,
    stock_sqrt="metal::precise::sqrt({})",
    stock_divide="metal::precise::divide({}, {})",
)
#: Stock's sqrt and divide per storage type in MLX's CUDA build (``Sqrt``, ``Divide`` in
#: ``mlx/backend/cuda/device/{unary,binary}_ops.cuh``, with CUDA's ``cuda_fp16.hpp``/``cuda_bf16.hpp`` and CCCL's
#: ``cuda::std::sqrt``): on ``T`` values held in float32, the same intrinsics on the same ``T`` values.
CUDA_STOCK_HEADER = """
#ifndef RMSPROP_CUDA_STOCK_OPS
#define RMSPROP_CUDA_STOCK_OPS
template <typename T> __device__ float stock_sqrt(float x) { return __fsqrt_rn(x); }
template <> __device__ float stock_sqrt<__half>(float x) { return __half2float(hsqrt(__float2half_rn(x))); }
template <> __device__ float stock_sqrt<__nv_bfloat16>(float x) {
  return __bfloat162float(hsqrt(__float2bfloat16_rn(x)));
}
template <typename T> __device__ float stock_divide(float a, float b) { return __fdiv_rn(a, b); }
template <> __device__ float stock_divide<__half>(float a, float b) {
  return __half2float(__hdiv(__float2half_rn(a), __float2half_rn(b)));
}
template <> __device__ float stock_divide<__nv_bfloat16>(float a, float b) {
  return __bfloat162float(__hdiv(__float2bfloat16_rn(a), __float2bfloat16_rn(b)));
}
#endif
"""
# CUDA rounds the grid up to whole blocks, so the last block's spare threads must stop at the bounds check.
CUDA = Backend(
    name="cuda",
    factory="cuda_kernel",
    index="cooperative_groups::this_grid().thread_rank()",
    index_type="unsigned long long",
    mul="__fmul_rn({}, {})",
    add="__fadd_rn({}, {})",
    sub="__fsub_rn({}, {})",
    sqrt="__fsqrt_rn({})",
    divide="__fdiv_rn({}, {})",
    to_float="static_cast<float>({})",
    from_float="static_cast<T>({})",
    whole_blocks=True,
    signature_by_size=False,
    stock_sqrt="stock_sqrt<T>({})",
    stock_divide="stock_divide<T>({}, {})",
    header=CUDA_STOCK_HEADER,
)


def input_names(n_gradients: int) -> list[str]:
    """``w``, ``v``, ``hyper``, ``offsets``, then one name per gradient leaf: ``g0``, ``g1``, ..."""
    return [*FIXED_INPUT_NAMES, *(f"g{j}" for j in range(n_gradients))]


def kernel_source(backend: Backend, precision: str = "stock", n_gradients: int = 1) -> str:
    """The kernel body (MLX generates the signature) for element ``i`` of a launch over ``n_gradients`` leaves.

    ``offsets[j]`` is where gradient ``j`` starts in the packed ``w`` and ``v``;
    ``offsets[n_gradients]`` is their size.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision is one of {PRECISIONS}, not {precision!r}")
    if not 1 <= n_gradients <= MAX_LEAVES_PER_LAUNCH:
        raise ValueError(f"a launch takes 1 to {MAX_LEAVES_PER_LAUNCH} gradient leaves, not {n_gradients}")
    b = backend
    f, t = b.to_float.format, b.from_float.format
    # stock rounds every operation's result to T, and takes sqrt and divide as its device code does; float32 rounds
    # only at the stores
    r = (lambda x: f(t(x))) if precision == "stock" else (lambda x: x)
    sqrt, divide = (b.stock_sqrt, b.stock_divide) if precision == "stock" else (b.sqrt, b.divide)
    n = f"offsets[{n_gradients}]"
    pick = [f"(i < offsets[{j + 1}]) ? g{j}[i - offsets[{j}]] :" for j in range(n_gradients - 1)]
    g_i = " ".join([*pick, f"g{n_gradients - 1}[i - offsets[{n_gradients - 1}]]"])
    return "\n".join(
        [
            f"const {b.index_type} i = {b.index};",
            f"if (i >= {n}) return;",
            "const float lr = hyper[0], alpha = hyper[1], one_minus_alpha = hyper[2], eps = hyper[3];",
            f"const float g_i = {f(f'({g_i})')};",
            f"const float v_a = {r(b.mul.format('alpha', f('v[i]')))};",
            f"const float v_b = {r(b.mul.format('one_minus_alpha', r(b.mul.format('g_i', 'g_i'))))};",
            f"const float v_i = {r(b.add.format('v_a', 'v_b'))};",
            f"const float denom = {r(b.add.format(r(sqrt.format('v_i')), 'eps'))};",
            f"const float step = {r(divide.format(r(b.mul.format('lr', 'g_i')), 'denom'))};",
            f"v_new[i] = {t('v_i')};",
            f"w_new[i] = {t(b.sub.format(f('w[i]'), 'step'))};",
            "",
        ]
    )


@dataclass(frozen=True)
class LaunchGeometry:
    grid: tuple[int, int, int]  # threads in all, as MLX counts the grid on both back-ends
    threadgroup: tuple[int, int, int]


def max_launch_elements(backend: Backend, itemsize: int, max_buffer_bytes: int | None = None) -> int:
    """The most elements one launch may cover: MLX's int grid (on CUDA, rounded up to whole blocks in int
    arithmetic), and ``max_buffer_bytes`` per packed buffer where the device has such a limit."""
    limit = MAX_GRID - (THREADS_PER_GROUP - 1 if backend.whole_blocks else 0)
    return limit if max_buffer_bytes is None else min(limit, max_buffer_bytes // itemsize)


def launch_geometry(n_elements: int, threads_per_group: int = THREADS_PER_GROUP, max_elements: int = MAX_GRID):
    """One thread per element, in groups of ``threads_per_group`` (fewer for a smaller buffer)."""
    if not 1 <= n_elements <= max_elements:
        raise ValueError(f"a launch covers 1 to {max_elements} elements, not {n_elements}")
    return LaunchGeometry((n_elements, 1, 1), (min(n_elements, threads_per_group), 1, 1))


def input_kinds(backend: Backend, inputs: list[mx.array]) -> str:
    """What MLX's generated signature depends on beyond dtypes: on Metal, ``c`` for each input passed in
    ``constant`` memory and ``d`` for ``device``; ``""`` where the signature does not depend on sizes."""
    if not backend.signature_by_size:
        return ""
    return "".join("c" if x.size < METAL_CONSTANT_BELOW else "d" for x in inputs)


@functools.cache
def shared_kernel(backend: Backend, precision: str = "stock", n_gradients: int = 1, kinds: str = "") -> Any:
    """The kernel object, built once per process, back-end, precision, gradient count and input kinds
    (:func:`input_kinds`, part of its name), then reused."""
    make = getattr(mx.fast, backend.factory)
    return make(
        name=kernel_name(precision, n_gradients, kinds),
        input_names=input_names(n_gradients),
        output_names=list(OUTPUT_NAMES),
        source=kernel_source(backend, precision, n_gradients),
        **({"header": backend.header} if backend.header else {}),
    )


def kernel_name(precision: str, n_gradients: int, kinds: str = "") -> str:
    """The name MLX builds the kernel's own from: one name, one generated source, on every MLX release."""
    return f"rmsprop_step_{precision}_{n_gradients}" + (f"_{kinds}" if kinds else "")


def stock_constants(alpha: float, eps: float, dtype: mx.Dtype, precision: str) -> mx.array:
    """``[alpha, 1 - alpha, eps]`` as float32; for ``"stock"``, rounded to ``dtype`` the way stock rounds them.

    Stock multiplies ``v`` by the Python float ``alpha``, which MLX turns into
    a scalar of ``v``'s dtype; the same product with a one of that dtype gives
    the same rounding.
    """
    if precision == "float32":
        return mx.array([alpha, 1.0 - alpha, eps], dtype=mx.float32)
    one = mx.ones((), dtype=dtype)
    return mx.stack([alpha * one, (1 - alpha) * one, eps * one]).astype(mx.float32)


def hyperparameters(lr: mx.array, constants: mx.array, dtype: mx.Dtype, precision: str) -> mx.array:
    """``[lr, alpha, 1 - alpha, eps]`` in float32; for ``"stock"``, lr rounded to ``dtype`` as stock casts it."""
    lr = mx.reshape(lr, (1,))
    if precision == "stock":
        lr = lr.astype(dtype)
    return mx.concatenate([lr.astype(mx.float32), constants])


def dispatch(
    kernel: Any,
    w: mx.array,
    v: mx.array,
    gradients: list[mx.array],
    offsets: mx.array,
    hyper: mx.array,
    stream: Any = mx.gpu,
    max_elements: int = MAX_GRID,
) -> tuple[mx.array, mx.array]:
    """Launch ``kernel`` once over the packed 1-D ``w`` and ``v`` and the 1-D gradient leaves; returns new ``(w, v)``.

    ``offsets`` (uint32) holds where each gradient starts in ``w`` and, last, ``w``'s size.
    """
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the GPU kernels update float32, float16 and bfloat16, not {w.dtype}")
    if w.size == 0:
        return w, v
    geometry = launch_geometry(w.size, max_elements=max_elements)
    w_new, v_new = kernel(
        inputs=[w, v, hyper, offsets, *gradients],
        template=[("T", w.dtype)],
        grid=geometry.grid,
        threadgroup=geometry.threadgroup,
        output_shapes=[w.shape, v.shape],
        output_dtypes=[w.dtype, v.dtype],
        stream=stream,
    )
    return w_new, v_new


@dataclass(frozen=True)
class Launch:
    """The leaves one launch updates. ``group`` lays out its packed ``w`` and ``v`` (``group.offsets`` is the
    kernel's offsets table); ``start`` places them in their dtype's packed gradients, for
    :class:`~rmsprop_impls.packing.PackedGradients`."""

    group: DtypeGroup
    start: int


def plan_launches(
    layout: FlatLayout, max_leaves: int = MAX_LEAVES_PER_LAUNCH, max_elements=lambda itemsize: MAX_GRID
) -> list[Launch]:
    """Each dtype's non-empty leaves, in tree order, in runs of at most ``max_leaves`` leaves and
    ``max_elements(itemsize)`` elements (:func:`max_launch_elements`): one launch per run."""
    launches = []
    for grp in layout.groups:
        limit = max_elements(grp.dtype.size)
        sizes = [grp.offsets[p + 1] - grp.offsets[p] for p in range(len(grp.indices))]
        runs: list[list[int]] = []  # positions within grp
        run_size = 0
        for p, size in enumerate(sizes):
            if size == 0:
                continue
            if size > limit:
                raise ValueError(
                    f"leaf {grp.indices[p]} has {size} elements; one {grp.dtype} launch on this device covers at "
                    f"most {limit} (the device's buffer or grid limit): split the parameter, or use eager"
                )
            if not runs or len(runs[-1]) == max_leaves or run_size + size > limit:
                runs.append([])
                run_size = 0
            runs[-1].append(p)
            run_size += size
        for run in runs:
            offsets = tuple(itertools.accumulate((sizes[p] for p in run), initial=0))
            indices, shapes = tuple(grp.indices[p] for p in run), tuple(grp.shapes[p] for p in run)
            launches.append(Launch(DtypeGroup(grp.dtype, indices, shapes, offsets), grp.offsets[run[0]]))
    return launches


class GpuKernelOptimizer(PackedOptimizer):
    """A hand-written kernel over packed ``w`` and ``v`` and unpacked gradients; subclasses name the back-end.

    Args (beyond RMSprop's): ``precision``, ``"stock"`` (default: stock's
    numbers bit for bit) or ``"float32"`` (one rounding).
    """

    backend: Backend

    def __init__(self, learning_rate, *hyper, precision: str = "stock", **named):
        if precision not in PRECISIONS:
            raise ValueError(f"precision is one of {PRECISIONS}, not {precision!r}")
        reason = self.unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(self.name, reason)
        super().__init__(learning_rate, *hyper, **named)
        self.precision = precision
        self._launches: list[Launch] = []
        self._launch_offsets: list[mx.array] = []
        self._planned_for: FlatLayout | None = None
        self._constants: dict[mx.Dtype, mx.array] = {}

    def _max_elements(self, itemsize: int) -> int:
        return max_launch_elements(self.backend, itemsize, self.max_buffer_bytes())

    @classmethod
    def max_buffer_bytes(cls) -> int | None:
        """The device's largest buffer (Metal's ``max_buffer_length``), or ``None`` where there is no such limit."""
        return None

    def _plan(self, layout: FlatLayout) -> None:
        if layout is not self._planned_for:
            self._launches = plan_launches(layout, max_elements=self._max_elements)
            self._launch_offsets = [mx.array(launch.group.offsets, dtype=mx.uint32) for launch in self._launches]
            self._planned_for = layout

    def _hyper(self, dtype: mx.Dtype, lr: mx.array) -> mx.array:
        if dtype not in self._constants:
            self._constants[dtype] = stock_constants(self.alpha, self.eps, dtype, self.precision)
        return hyperparameters(lr, self._constants[dtype], dtype, self.precision)

    def _gradients(self, launch: Launch, g: list[mx.array]) -> tuple[list[mx.array], mx.array | None]:
        """The launch's gradients, and the offsets to use when they are not one buffer per leaf."""
        if self._packed_g:
            buffer = self._packed_g[launch.group.dtype]
            end = launch.start + launch.group.size
            part = buffer if (launch.start, end) == (0, buffer.size) else buffer[launch.start : end]
            return [part], mx.array([0, launch.group.size], dtype=mx.uint32)
        return [g[i].reshape(-1) for i in launch.group.indices], None

    def takes_leaf(self, w, g, states):
        return self.rule.name == "rmsprop" and super().takes_leaf(w, g, states)

    def update_leaves(self, w, g, s, scalars):
        v, lr = s["v"], scalars.lr
        self._plan(self._layout_for(w))
        new_w, new_v = list(w), list(v)  # empty leaves stay as they are
        hyper: dict[mx.Dtype, mx.array] = {}
        for launch, offsets in zip(self._launches, self._launch_offsets):
            grp = launch.group
            if grp.dtype not in hyper:
                hyper[grp.dtype] = self._hyper(grp.dtype, lr)
            wb = pack_group(grp, [w[i] for i in grp.indices])
            vb = pack_group(grp, [v[i] for i in grp.indices])
            grads, packed_offsets = self._gradients(launch, g)
            launch_offsets = offsets if packed_offsets is None else packed_offsets
            kinds = input_kinds(self.backend, [wb, vb, hyper[grp.dtype], launch_offsets, *grads])
            kernel = shared_kernel(self.backend, self.precision, len(grads), kinds)
            limit = self._max_elements(grp.dtype.size)
            wb, vb = dispatch(kernel, wb, vb, grads, launch_offsets, hyper[grp.dtype], max_elements=limit)
            w_views, v_views = unpack_group(grp, wb), unpack_group(grp, vb)
            for i, wi, vi in zip(grp.indices, w_views, v_views):
                new_w[i], new_v[i] = wi, vi
        return new_w, {"v": new_v}
