"""The Metal and CUDA kernel bodies, generated from a rule's traced update (:mod:`rmsprop_impls.rules.element`).

A rule never reaches this module by name: :func:`kernel_source` walks the
rule's :class:`~rmsprop_impls.rules.element.Trace` with
:func:`~rmsprop_impls.rules.codegen.emit` and a per-back-end spelling
(:class:`Backend`) of each node, so every rule of ``mlx.optimizers`` gets its
kernel from the one description its MLX ops also come from.

**Numbers.** ``precision="stock"`` (the default) gives the stock class's numbers
on the same device bit for bit in every dtype. Each node of kind ``T`` is
rounded to the storage type ``T`` after its operation, as stock's MLX op on a
``T`` array rounds it; nodes of kind ``float32`` (the raw learning rate, Adam's
bias corrections and what is computed from them) stay in float32, as stock's
float32 arrays do. Each operation is computed as stock's device code computes it:

- Metal, and CUDA's float32: every operation runs in float32 and is rounded
  once to ``T``; float32 has more than twice the bits of float16 and bfloat16
  plus two, so that gives the correctly rounded result, which is what MLX
  computes there.
- CUDA's float16 and bfloat16: MLX's CUDA ``Sqrt`` is ``cuda::std::sqrt``, which
  is ``hsqrt`` for both (``sqrt.approx.ftz.f32``, resp. ``sqrt.approx.f32``, then
  rounded to ``T``), and its ``Divide`` is ``x / y``, which is ``__hdiv``
  (float16: ``rcp.approx.ftz.f32`` times the dividend, corrected only for tiny
  results; bfloat16: ``div.approx.f32``). Neither is correctly rounded, so the
  kernel calls the same intrinsics on the same ``T`` values
  (:data:`CUDA_STOCK_HEADER`); add and multiply are ``__hadd``/``__hmul``,
  correctly rounded, as here.
- ``abs``, ``sign`` and ``maximum`` are exact, spelled as MLX's kernels compute
  them (``Abs``, ``Sign`` in ``mlx/backend/metal/kernels/unary_ops.h`` and
  ``mlx/backend/cuda/device/unary_ops.cuh``; ``Maximum`` in ``binary_ops.h`` and
  ``binary_ops.cuh``): ``abs`` clears the sign (``metal::abs``; CUDA's ``abs``,
  ``__habs`` for both half types in ``fp16_math.cuh``); ``sign`` is ``(x > 0) - (x < 0)``, so ``sign(NaN)``
  and ``sign(-0)`` are ``+0`` (CUDA's ``__nv_bfloat16`` case goes through float,
  the same numbers); ``maximum(x, y)`` is ``isnan(x) ? x : (x > y ? x : y)``, so
  a NaN in either argument wins and ``maximum(+0, -0)`` is ``-0``. On ``T``
  values held exactly in float32 these give the same values (for NaN: a NaN).

``precision="float32"`` keeps every intermediate in float32 and rounds once,
at the stores, with correctly rounded float32 sqrt and divide on both back-ends:
more accurate, not stock's numbers in float16 and bfloat16; the option for
correctly rounded numbers on CUDA. On CUDA every float operation is spelled
with its ``_rn`` intrinsic, which the compiler never fuses into a multiply-add
(NVRTC's default ``--fmad=true`` would), so both modes are deterministic.

**Inputs.** ``w``, each state array the trace reads, ``scalars`` (float32:
``lr`` and the step's values the trace reads, in :class:`KernelLayout` order,
then every constant slot of the trace), ``offsets`` and one buffer per
gradient leaf; outputs ``w_new`` and ``<state>_new`` for each state it changes.
Hyper-parameters are slots, never template values or literals: one kernel
serves every value of them, and a schedule changes nothing but an input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..rules.codegen import emit
from ..rules.element import F32, Node, T, Trace

PRECISIONS = ("stock", "float32")
#: Metal's limit of buffer arguments per kernel (``[[buffer(n)]]``, n < 31); the CUDA launches keep to it too.
METAL_MAX_BUFFERS = 31
SCALARS, OFFSETS = "scalars", "offsets"


@dataclass(frozen=True)
class Backend:
    """How one GPU language spells what the generated kernel bodies use (format strings over argument names)."""

    name: str
    factory: str  # the mx.fast function that builds the kernel object
    index: str  # this thread's element, as an integer expression
    index_type: str
    mul: str  # float32 operations, each correctly rounded and never fused
    add: str
    sub: str
    sqrt: str
    divide: str
    abs: str  # exact operations, as MLX's Abs, Sign and Maximum compute them
    sign: str
    maximum: str
    to_float: str  # the casts to and from the storage type T
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
    abs="metal::abs({})",  # unary_ops.h Abs
    sign="float(({0} > 0.0f) - ({0} < 0.0f))",  # unary_ops.h Sign
    maximum="(metal::isnan({0}) ? {0} : ({0} > {1} ? {0} : {1}))",  # binary_ops.h Maximum
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
    abs="fabsf({})",  # unary_ops.cuh Abs: fp16_math.cuh's abs, __habs for __half and __nv_bfloat16, fabsf for float
    sign="static_cast<float>(({0} > 0.0f) - ({0} < 0.0f))",  # unary_ops.cuh Sign
    maximum="(isnan({0}) ? {0} : ({0} > {1} ? {0} : {1}))",  # binary_ops.cuh Maximum
    to_float="static_cast<float>({})",
    from_float="static_cast<T>({})",
    whole_blocks=True,
    signature_by_size=False,
    stock_sqrt="stock_sqrt<T>({})",
    stock_divide="stock_divide<T>({}, {})",
    header=CUDA_STOCK_HEADER,
)


@dataclass(frozen=True)
class KernelLayout:
    """The buffers a trace's kernel takes and gives, beside ``w``, ``scalars``, ``offsets`` and the gradients."""

    state_inputs: tuple[str, ...]  # the state arrays the update reads, in the rule's order
    state_outputs: tuple[str, ...]  # the state arrays it changes, in the order the rule returns them
    scalar_inputs: tuple[str, ...]  # lr and the step's values it reads; the trace's slots follow them
    n_slots: int

    @property
    def max_leaves(self) -> int:
        """Gradient buffers one launch may take: Metal's 31 buffers less the fixed inputs and the outputs
        (RMSprop 25, Adam and AdamW 23, plain SGD 27)."""
        return METAL_MAX_BUFFERS - len(self.input_names(0)) - len(self.output_names())

    def input_names(self, n_gradients: int) -> list[str]:
        return ["w", *self.state_inputs, SCALARS, OFFSETS, *(f"g{j}" for j in range(n_gradients))]

    def output_names(self) -> list[str]:
        return ["w_new", *(f"{name}_new" for name in self.state_outputs)]


def kernel_layout(trace: Trace) -> KernelLayout:
    """What the kernel generated from ``trace`` reads and writes (a state neither read nor written is absent)."""
    used = trace.used_inputs()
    t_inputs = [name for name, v in trace.inputs.items() if v.node.kind == T]
    f32_inputs = [name for name, v in trace.inputs.items() if v.node.kind == F32]
    return KernelLayout(
        state_inputs=tuple(name for name in t_inputs if name not in ("w", "g") and name in used),
        state_outputs=tuple(trace.state_out),
        scalar_inputs=tuple(name for name in f32_inputs if name in used),
        n_slots=len(trace.slots),
    )


def _spelling(backend: Backend, precision: str, layout: KernelLayout):
    """``spell(node, argument names)`` for :func:`~rmsprop_impls.rules.codegen.emit`."""
    b, stock = backend, precision == "stock"
    slot_base = len(layout.scalar_inputs)

    def spell(node: Node, args: list[str]) -> str:
        in_t = stock and node.kind == T  # stock rounds this node to T, and computes it as stock's device code does
        op = node.op
        if op == "slot":
            expr = f"{SCALARS}[{slot_base + node.slot}]"
        elif op == "cast":
            expr = args[0]
        elif op == "square":
            expr = b.mul.format(args[0], args[0])
        elif op == "sqrt":
            expr = (b.stock_sqrt if in_t else b.sqrt).format(*args)
        elif op == "div":
            expr = (b.stock_divide if in_t else b.divide).format(*args)
        else:  # add, sub, mul, abs, sign, maximum
            expr = getattr(b, op).format(*args)
        return b.to_float.format(b.from_float.format(expr)) if in_t else expr

    return spell


def kernel_source(backend: Backend, trace: Trace, precision: str = "stock", n_gradients: int = 1) -> str:
    """The kernel body (MLX generates the signature) for element ``i`` of a launch over ``n_gradients`` leaves.

    ``offsets[j]`` is where gradient ``j`` starts in the packed ``w`` and states;
    ``offsets[n_gradients]`` is their size.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision is one of {PRECISIONS}, not {precision!r}")
    layout = kernel_layout(trace)
    if not 1 <= n_gradients <= layout.max_leaves:
        raise ValueError(f"a launch takes 1 to {layout.max_leaves} gradient leaves, not {n_gradients}")
    b, f, t = backend, backend.to_float.format, backend.from_float.format
    scalar_index = {name: k for k, name in enumerate(layout.scalar_inputs)}

    def input_name(node: Node) -> str:
        return f"{SCALARS}[{scalar_index[node.name]}]" if node.kind == F32 else f"{node.name}_i"

    code = emit(trace, _spelling(backend, precision, layout), input_name=input_name)
    pick = [f"(i < {OFFSETS}[{j + 1}]) ? g{j}[i - {OFFSETS}[{j}]] :" for j in range(n_gradients - 1)]
    g_i = " ".join([*pick, f"g{n_gradients - 1}[i - {OFFSETS}[{n_gradients - 1}]]"])
    loads = [f"const float g_i = {f(f'({g_i})')};"] if "g" in code.inputs else []
    arrays = [name for name in ("w", *layout.state_inputs) if name in code.inputs]
    loads += [f"const float {name}_i = {f(f'{name}[i]')};" for name in arrays]
    results = [code.results[name] for name in ("w", *layout.state_outputs)]
    stores = [f"{out}[i] = {t(result)};" for out, result in zip(layout.output_names(), results)]
    lines = [f"const {b.index_type} i = {b.index};", f"if (i >= {OFFSETS}[{n_gradients}]) return;"]
    return "\n".join([*lines, *code.uniform, *loads, *code.per_element, *stores, ""])


def kernel_name(source: str, kinds: str = "") -> str:
    """A name for exactly one source (MLX builds the kernel's own name from it): a digest of the body, then the
    input kinds (:func:`~rmsprop_impls.kernels.gpu_kernels.input_kinds`) that MLX's signature depends on."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"opt_step_{digest}" + (f"_{kinds}" if kinds else "")
