"""The full kernel source MLX builds around a ``metal_kernel``/``cuda_kernel`` body.

Metal, from MLX 0.32.0: MLX itself writes it. Without a Metal device,
``mx.fast.metal_kernel`` still records a launch while ``mx.export_function``
traces (MLX's ``resolve_metal_kernel_stream`` in
``mlx/backend/common/metal_kernel.cpp``), and the exported file holds the
``CustomKernel``'s name and generated source, so :func:`metal_source` reads back
exactly what the installed MLX would hand to the Metal compiler (less the
``metal::utils()`` prelude it prepends at build time, which the shim replaces).

Metal, 0.30.1 to 0.31.x: ``mx.fast.metal_kernel`` refuses to build without
Metal, so :func:`metal_source_by_rule` writes the source as those releases'
``write_signature`` and ``metal_kernel`` (``mlx/backend/metal/custom_kernel.cpp``
at v0.31.2, unchanged since v0.30.1) do: the same as 0.32's except that the
kernel's name holds no input or output kinds (MLX's 87c3cf9, in 0.32.0, added
them). On 0.32 the rule is checked against MLX's own export.

CUDA: a CPU build of MLX refuses ``mx.fast.cuda_kernel`` at once, so
:func:`cuda_source` follows ``build_kernel`` and ``template_arguments_hash`` in
``mlx/backend/cuda/custom_kernel.cpp`` (ml-explore/mlx 846d176, 0.32.1+26),
with ``dtype_to_cuda_type`` from ``mlx/backend/cuda/utils.cpp``; the strings it
uses appear verbatim in mlx-cuda-12 0.32.4's ``libmlx.so``.
"""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path

import mlx.core as mx

#: MLX's get_type_string (mlx/backend/common/compiled.cpp): Metal's spelling, and the template hash's.
TYPE_STRING = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t"}
#: dtype_to_cuda_type (mlx/backend/cuda/utils.cpp).
CUDA_TYPE = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t"}

CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def metal_source(kernel, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes) -> tuple[str, str]:
    """``(kernel name, full source)`` as the installed MLX generates them for this launch."""

    def launch(*arrays):
        return kernel(inputs=list(arrays), template=template, grid=grid, threadgroup=threadgroup,
                      output_shapes=output_shapes, output_dtypes=output_dtypes, stream=mx.gpu)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launch.mlxfn"
        mx.export_function(str(path), launch, *inputs)
        data = path.read_bytes()
    # The source is stored as a little-endian 64-bit length, then its bytes; with a template it starts so.
    start = data.index(b"template <typename T>\n[[kernel]] void ")
    (length,) = struct.unpack_from("<Q", data, start - 8)
    source = data[start : start + length].decode()
    name = re.search(r"\[\[kernel\]\] void (\w+)\(", source).group(1)
    return name, source


def cuda_source(
    name: str,
    input_names: list[str],
    inputs: list[mx.array],
    output_names: list[str],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, mx.Dtype]],
    source: str,
    header: str = "",
) -> tuple[str, str]:
    """``(kernel name, full source)`` as ``mx.fast.cuda_kernel`` builds them (``build_kernel``)."""
    kernel_name = "custom_kernel_" + name + "".join(f"_{TYPE_STRING[dtype]}" for _, dtype in template)
    shape_infos = [tuple(f"{n}_{what}" in source for what in ("shape", "strides", "ndim")) for n in input_names]
    out = [CUDA_DEFAULT_HEADER, header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"]
    out.append(f"__global__ void {kernel_name}(\n")
    for n, x, (shape, strides, ndim) in zip(input_names, inputs, shape_infos):
        out.append(f"    const {CUDA_TYPE[x.dtype]}* {n},\n")
        if x.ndim > 0:
            out += [f"    const __grid_constant__ Shape {n}_shape,\n"] if shape else []
            out += [f"    const __grid_constant__ Strides {n}_strides,\n"] if strides else []
            out += [f"    const __grid_constant__ int {n}_ndim,\n"] if ndim else []
    for k, (n, dtype) in enumerate(zip(output_names, output_dtypes)):
        out.append(f"    {CUDA_TYPE[dtype]}* {n}" + (",\n" if k < len(output_names) - 1 else ") {\n"))
    if template:
        out += [f"  using {t} = {CUDA_TYPE[dtype]};\n" for t, dtype in template] + ["\n"]
    out += [source, "\n}\n\n} // namespace mlx::core::cu\n"]
    return kernel_name, "".join(out)


#: MLX's ``max_constant_array_size``: a Metal input of fewer elements is passed in ``constant`` memory.
METAL_CONSTANT_BELOW = 8


def metal_source_by_rule(
    name: str,
    input_names: list[str],
    inputs: list[mx.array],
    output_names: list[str],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, mx.Dtype]],
    source: str,
    kinds_in_name: bool,
) -> tuple[str, str]:
    """``(kernel name, full source)`` as ``metal_kernel`` writes them for a source whose only attribute is
    ``thread_position_in_grid``; ``kinds_in_name``: MLX 0.32.0 on, which names each input's and output's kind."""
    kernel_name = "custom_kernel_" + name
    if template:  # "_" + write_template's "<float, ...>" with "<", ">" and ", " as "_", less its last "_"
        kernel_name += "__" + "_".join(TYPE_STRING[dtype] for _, dtype in template)
    if kinds_in_name:
        for x in inputs:
            kernel_name += f"_{TYPE_STRING[x.dtype]}" + (
                "s" if x.ndim == 0 else "c" if x.size < METAL_CONSTANT_BELOW else ""
            )
        kernel_name += "".join(f"_{TYPE_STRING[dtype]}" for dtype in output_dtypes)
    out = ["template <" + ", ".join(f"typename {t}" for t, _ in template) + ">\n"] if template else []
    out.append(f"[[kernel]] void {kernel_name}(\n")
    for k, (n, x) in enumerate(zip(input_names, inputs)):
        where = "constant" if x.size < METAL_CONSTANT_BELOW else "device"
        out.append(f"  const {where} {TYPE_STRING[x.dtype]}{'&' if x.ndim == 0 else '*'} {n} [[buffer({k})]],\n")
    for k, (n, dtype) in enumerate(zip(output_names, output_dtypes)):
        out.append(f"  device {TYPE_STRING[dtype]}* {n} [[buffer({len(inputs) + k})]],\n")
    out += ["  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n", source, "\n}\n"]
    if template:
        instance = kernel_name + "<" + ", ".join(TYPE_STRING[dtype] for _, dtype in template) + ">"
        out.append(f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({instance}) {instance};\n')
    return kernel_name, "".join(out)


def metal_writes_kinds_in_name() -> bool:
    """Whether the installed MLX names a Metal kernel by its inputs' kinds (0.32.0 on)."""
    return tuple(int(part) for part in mx.__version__.split(".")[:2]) >= (0, 32)
