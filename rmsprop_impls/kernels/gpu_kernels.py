"""What the Metal and CUDA kernel variants share: the kernel objects, their launch shape and their dispatch.

The kernel bodies are generated from the rule's traced update
(:mod:`rmsprop_impls.kernels.gpu_source`, which also says how their numbers
relate to stock's); this module builds each distinct one once and launches it.

**Launch shape.** ``w`` and every state array the rule reads stay packed, one
buffer per chunk of leaves of one dtype, across steps (the parameters and
states handed back are views into the kernel's outputs). The gradients are
*not* packed: each launch takes up to :attr:`KernelLayout.max_leaves
<rmsprop_impls.kernels.gpu_source.KernelLayout.max_leaves>` gradient leaves as
separate buffers, and each thread finds its leaf from an offsets table. Metal
allows 31 buffer arguments; a launch uses ``w``, the states read, ``scalars``,
``offsets``, the outputs (``w`` and each state changed) and one per gradient:
RMSprop takes 25 leaves per launch, Adam and AdamW 23, plain SGD 27.

**Kernel objects.** One per back-end, trace signature (the rule's nodes for the
branches its hyper-parameters take, not their values), precision, gradient
count and, on Metal, which inputs MLX passes in ``constant`` memory (under 8
elements): MLX 0.30 and 0.31 name a Metal kernel without that, so one name
would get a second source, and MLX would free the first one's library while a
command buffer may still use it (fixed in MLX 0.32.0, which puts it in the name
too). A new hyper-parameter value or learning rate changes only the
``scalars`` input; the only template value is ``T``.

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

import itertools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..registry import VariantUnavailableError
from ..rules.element import Trace
from .gpu_source import CUDA, METAL, PRECISIONS, Backend, KernelLayout, kernel_layout, kernel_name, kernel_source
from .multi_tensor import PackedOptimizer
from .packing import DtypeGroup, FlatLayout, pack_group, unpack_group

__all__ = ["CUDA", "METAL", "PRECISIONS", "Backend", "GpuKernelOptimizer", "plan_launches", "shared_kernel"]

#: Threads per threadgroup (Metal) or block (CUDA): a multiple of both warp sizes, under both limits.
THREADS_PER_GROUP = 256
#: MLX takes the grid as 32-bit ints, and a 1-D MLX array holds at most this many elements anyway.
MAX_GRID = 2**31 - 1
#: MLX passes a Metal input of fewer elements in ``constant`` memory, a different signature (its
#: ``max_constant_array_size``).
METAL_CONSTANT_BELOW = 8
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


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


@dataclass(frozen=True)
class KernelSpec:
    """Everything one kernel object is built from; equal specs give the same source and the same object."""

    backend: Backend
    source: str
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @classmethod
    def of(cls, backend: Backend, trace: Trace, precision: str, n_gradients: int, kinds: str = "") -> KernelSpec:
        layout = kernel_layout(trace)
        source = kernel_source(backend, trace, precision, n_gradients)
        return cls(backend, source, kernel_name(source, kinds), tuple(layout.input_names(n_gradients)),
                   tuple(layout.output_names()))  # fmt: skip

    def build(self) -> Any:
        make = getattr(mx.fast, self.backend.factory)
        return make(
            name=self.name,
            input_names=list(self.input_names),
            output_names=list(self.output_names),
            source=self.source,
            **({"header": self.backend.header} if self.backend.header else {}),
        )


_KERNELS: dict[tuple, Any] = {}


def shared_kernel(backend: Backend, trace: Trace, precision: str = "stock", n_gradients: int = 1, kinds: str = ""):
    """The kernel object for this back-end, trace signature, precision, gradient count and input kinds
    (:func:`input_kinds`), built once per process, then reused: a hyper-parameter's value is no part of the key."""
    key = (backend, trace.signature(), precision, n_gradients, kinds)
    if key not in _KERNELS:
        _KERNELS[key] = KernelSpec.of(backend, trace, precision, n_gradients, kinds).build()
    return _KERNELS[key]


def step_scalars(trace: Trace, layout: KernelLayout, lr: mx.array, values: dict[str, mx.array]) -> mx.array:
    """The kernel's ``scalars`` input: ``lr`` and the step's values the trace reads, then its slots, in float32
    (rounded to ``T`` in the kernel where stock rounds them)."""
    named = {"lr": lr, **values}
    parts = [mx.reshape(mx.array(named[name]), (1,)).astype(mx.float32) for name in layout.scalar_inputs]
    if trace.slots:
        parts.append(mx.array(trace.slots, dtype=mx.float32))
    return mx.concatenate(parts) if parts else mx.zeros((1,), dtype=mx.float32)


def dispatch(
    kernel: Any,
    w: mx.array,
    inputs: list[mx.array],
    n_outputs: int,
    stream: Any = mx.gpu,
    max_elements: int = MAX_GRID,
) -> list[mx.array]:
    """Launch ``kernel`` once over the packed 1-D ``w`` and ``inputs`` (the states read, ``scalars``,
    ``offsets`` and the gradient leaves, in its input order); returns its ``n_outputs`` outputs, each like ``w``.

    ``offsets`` (uint32) holds where each gradient starts in ``w`` and, last, ``w``'s size.
    """
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the GPU kernels update float32, float16 and bfloat16, not {w.dtype}")
    if w.size == 0:
        return [w] * n_outputs
    geometry = launch_geometry(w.size, max_elements=max_elements)
    return kernel(
        inputs=[w, *inputs],
        template=[("T", w.dtype)],
        grid=geometry.grid,
        threadgroup=geometry.threadgroup,
        output_shapes=[w.shape] * n_outputs,
        output_dtypes=[w.dtype] * n_outputs,
        stream=stream,
    )


@dataclass(frozen=True)
class Launch:
    """The leaves one launch updates. ``group`` lays out its packed ``w`` and states (``group.offsets`` is the
    kernel's offsets table); ``start`` places them in their dtype's packed gradients, for
    :class:`~rmsprop_impls.packing.PackedGradients`."""

    group: DtypeGroup
    start: int


def plan_launches(layout: FlatLayout, max_leaves: int, max_elements=lambda itemsize: MAX_GRID) -> list[Launch]:
    """Each dtype's non-empty leaves, in tree order, in runs of at most ``max_leaves`` leaves (the rule's
    :attr:`~rmsprop_impls.kernels.gpu_source.KernelLayout.max_leaves`) and ``max_elements(itemsize)``
    elements (:func:`max_launch_elements`): one launch per run."""
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
    """A kernel generated from the rule, over packed ``w`` and states and unpacked gradients; subclasses name
    the back-end.

    Args (beyond the rule's): ``precision``, ``"stock"`` (default: stock's
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
        self._planned_for: tuple[FlatLayout, int] | None = None

    def _max_elements(self, itemsize: int) -> int:
        return max_launch_elements(self.backend, itemsize, self.max_buffer_bytes())

    @classmethod
    def max_buffer_bytes(cls) -> int | None:
        """The device's largest buffer (Metal's ``max_buffer_length``), or ``None`` where there is no such limit."""
        return None

    def _plan(self, layout: FlatLayout, max_leaves: int) -> None:
        """Plan once per layout and leaves per launch (a hyper-parameter may change the rule's branch)."""
        if self._planned_for is None or self._planned_for[0] is not layout or self._planned_for[1] != max_leaves:
            self._launches = plan_launches(layout, max_leaves, max_elements=self._max_elements)
            self._launch_offsets = [mx.array(launch.group.offsets, dtype=mx.uint32) for launch in self._launches]
            self._planned_for = (layout, max_leaves)

    def _gradients(self, launch: Launch, g: list[mx.array]) -> tuple[list[mx.array], mx.array | None]:
        """The launch's gradients, and the offsets to use when they are not one buffer per leaf."""
        if self._packed_g:
            buffer = self._packed_g[launch.group.dtype]
            end = launch.start + launch.group.size
            part = buffer if (launch.start, end) == (0, buffer.size) else buffer[launch.start : end]
            return [part], mx.array([0, launch.group.size], dtype=mx.uint32)
        return [g[i].reshape(-1) for i in launch.group.indices], None

    def update_leaves(self, w, g, s, scalars):
        trace = self.rule.trace(self.hyper)
        kernel_io = kernel_layout(trace)
        self._plan(self._layout_for(w), kernel_io.max_leaves)
        scalar_input = step_scalars(trace, kernel_io, scalars.lr, scalars.values)
        new_w = list(w)  # empty leaves stay as they are
        new_s = {name: list(s[name]) for name in kernel_io.state_outputs}
        for launch, offsets in zip(self._launches, self._launch_offsets):
            grp = launch.group
            wb = pack_group(grp, [w[i] for i in grp.indices])
            states = [pack_group(grp, [s[name][i] for i in grp.indices]) for name in kernel_io.state_inputs]
            grads, packed_offsets = self._gradients(launch, g)
            inputs = [*states, scalar_input, offsets if packed_offsets is None else packed_offsets, *grads]
            kernel = shared_kernel(self.backend, trace, self.precision, len(grads),
                                   input_kinds(self.backend, [wb, *inputs]))  # fmt: skip
            limit = self._max_elements(grp.dtype.size)
            outputs = dispatch(kernel, wb, inputs, 1 + len(kernel_io.state_outputs), max_elements=limit)
            for name, buffer in zip(("w", *kernel_io.state_outputs), outputs):
                target = new_w if name == "w" else new_s[name]
                for i, x in zip(grp.indices, unpack_group(grp, buffer)):
                    target[i] = x
        return new_w, new_s
