"""Compile a kernel's full generated source as C++ against the shims and run every thread of its grid on the CPU.

Metal runs exactly ``grid`` threads (``dispatch_threads``); CUDA runs
``ceil(grid / threadgroup)`` whole blocks, so the last block's spare threads
run too and must stop at the kernel's bounds check, as on the device
(``CustomKernel::eval_gpu`` in ``mlx/backend/cuda/custom_kernel.cpp``). Each
array travels as its raw bytes; MLX's own ``float16_t`` and ``bfloat16_t``
(the wheel's ``mlx/types/half_types.h``) are the GPU's half types.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from rmsprop_impls.kernels import gpu_kernels

from .mlx_sources import (
    CUDA_TYPE,
    TYPE_STRING,
    cuda_source,
    metal_source,
    metal_source_by_rule,
    metal_writes_kinds_in_name,
)

HERE = Path(__file__).parent
MLX_INCLUDE = Path(mx.__file__).parent / "include"  # python -m mlx --cmake-dir, then include/
BUILD_DIR = Path(tempfile.gettempdir()) / "rmsprop_bench_gpu_host"
#: -ffp-contract=off: each float operation rounds once, as the _rn intrinsics and metal::precise promise.
CXXFLAGS = ["-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-Wno-attributes", "-Wno-unknown-attributes"]
#: Taken before any test swaps it for a HostLauncher.
_REAL_SHARED_KERNEL = gpu_kernels.shared_kernel
_RAW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}


def compiler() -> str | None:
    """``$CXX`` (the clang lane sets ``clang++``), else ``g++``: the host compiler the simulations build with."""
    return shutil.which(os.environ.get("CXX") or "g++")


#: MLX's explicit instantiation, ``template [[host_name("k")]] [[kernel]] decltype(k<float>) k<float>;``: Metal's
#: compiler takes attributes there, GCC ignores them (-Wno-attributes), clang rejects them ("an attribute list
#: cannot appear here"), so the host build drops them.
_INSTANTIATION_ATTRIBUTES = re.compile(r"^template (\[\[[^\]]*\]\] )+(?=decltype)", re.MULTILINE)


def host_compatible(source: str) -> str:
    """``source`` with the one construct GCC and Metal accept but clang does not, made plain C++."""
    return _INSTANTIATION_ATTRIBUTES.sub("template ", source)


def _driver(language: str, kernel_name: str, source: str, inputs, output_dtypes, output_sizes, grid, block) -> str:
    types = TYPE_STRING if language == "metal" else CUDA_TYPE
    args = [f"reinterpret_cast<const {types[x.dtype]}*>(in[{k}].data())" for k, x in enumerate(inputs)]
    args += [f"reinterpret_cast<{types[dt]}*>(out[{k}].data())" for k, dt in enumerate(output_dtypes)]
    if language == "metal":
        template = TYPE_STRING[inputs[0].dtype]
        prelude, threads = '#include "metal_shim.h"\n', f"{grid}"
        call = f"{kernel_name}<{template}>({', '.join(args)}, uint3{{uint(t), 0, 0}});"
    else:
        prelude, threads = "", f"(({grid} + {block} - 1) / {block}) * {min(block, grid)}"
        call = f"gpu_host::thread_rank = t; mlx::core::cu::{kernel_name}({', '.join(args)});"
    sizes = ", ".join(str(n) for n in output_sizes)
    # the standard headers come first: the Metal shim defines `device` and `constant` away
    return f"""#include <fstream>
#include <iterator>
#include <string>
#include <vector>
{prelude}
// ---- the full source MLX builds ----
{host_compatible(source)}
// ---- the host runner ----

int main(int argc, char** argv) {{
  const std::string dir = argv[1];
  std::vector<std::vector<char>> in;
  for (int k = 0; k < {len(inputs)}; ++k) {{
    std::ifstream f(dir + "/in" + std::to_string(k) + ".bin", std::ios::binary);
    in.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }}
  const std::vector<size_t> out_bytes = {{{sizes}}};
  std::vector<std::vector<char>> out;
  for (size_t n : out_bytes) out.emplace_back(n, char(0x7f));  // unwritten elements show up as NaN-ish garbage
  const unsigned long long threads = {threads};
  for (unsigned long long t = 0; t < threads; ++t) {{
    {call}
  }}
  for (size_t k = 0; k < out.size(); ++k) {{
    std::ofstream f(dir + "/out" + std::to_string(k) + ".bin", std::ios::binary);
    f.write(out[k].data(), out[k].size());
  }}
  return 0;
}}
"""


def _build(driver: str) -> Path:
    cxx = compiler()
    digest = hashlib.sha256(f"{cxx}\0{CXXFLAGS}\0{driver}".encode()).hexdigest()[:16]  # one binary per compiler
    binary = BUILD_DIR / f"kernel_{digest}"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    src = BUILD_DIR / f"kernel_{digest}.cpp"
    src.write_text(driver)
    cmd = [cxx, *CXXFLAGS, f"-I{HERE}", f"-I{HERE / 'cuda_include'}", f"-I{MLX_INCLUDE}", str(src), "-o"]
    tmp = binary.with_suffix(".tmp")
    result = subprocess.run([*cmd, str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed on {src}:\n{result.stderr[-4000:]}")
    tmp.rename(binary)
    return binary


def generated_source(language, kernel, *, name, input_names, output_names, source, inputs, template, grid,
                     threadgroup, output_shapes, output_dtypes) -> tuple[str, str]:  # fmt: skip
    """``(kernel name, full source)`` as the installed MLX release generates them for this launch."""
    if language == "cuda":
        header = gpu_kernels.CUDA.header
        return cuda_source(name, input_names, inputs, output_names, output_dtypes, template, source, header)
    if kernel is None:  # MLX 0.30-0.31: metal_kernel cannot be built without Metal
        return metal_source_by_rule(name, input_names, inputs, output_names, output_dtypes, template, source, False)
    return metal_source(kernel, inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                        output_shapes=output_shapes, output_dtypes=output_dtypes)  # fmt: skip


def run_kernel(language, kernel, *, name, input_names, output_names, source, inputs, template, grid, threadgroup,
               output_shapes, output_dtypes) -> list[mx.array]:  # fmt: skip
    """Run one launch of a kernel object's generated source on the host; returns its outputs."""
    kernel_name, full = generated_source(language, kernel, name=name, input_names=input_names,
                                         output_names=output_names, source=source, inputs=inputs, template=template,
                                         grid=grid, threadgroup=threadgroup, output_shapes=output_shapes,
                                         output_dtypes=output_dtypes)  # fmt: skip
    sizes = [int(np.prod(s)) for s in output_shapes]
    binary = _build(_driver(language, kernel_name, full, inputs, output_dtypes,
                            [n * dt.size for n, dt in zip(sizes, output_dtypes)], grid[0], threadgroup[0]))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for k, x in enumerate(inputs):
            np.array(x.view(_RAW[x.dtype.size])).tofile(Path(tmp) / f"in{k}.bin")
        subprocess.run([str(binary), tmp], check=True)
        outs = []
        for k, (shape, dt) in enumerate(zip(output_shapes, output_dtypes)):
            raw = np.fromfile(Path(tmp) / f"out{k}.bin", dtype=np.dtype(f"u{dt.size}"))
            outs.append(mx.array(raw).view(dt).reshape(shape))
    return outs


class HostLauncher:
    """Stands in for the kernel object ``shared_kernel(backend, trace, precision, n, kinds)`` returns, running its
    generated source on the host; records each launch."""

    def __init__(self, backend, trace, precision: str, n_gradients: int, kinds: str = ""):
        self.language = backend.name
        spec = gpu_kernels.KernelSpec.of(backend, trace, precision, n_gradients, kinds)
        self.names = dict(name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names))
        self.source = spec.source
        # From MLX 0.32, Metal's kernel object builds here (it only refuses to launch), and MLX writes its source
        # while exporting; before, it refuses to build, and the source is written by MLX's rule.
        metal_builds = self.language == "metal" and metal_writes_kinds_in_name()
        self.kernel = _REAL_SHARED_KERNEL(backend, trace, precision, n_gradients, kinds) if metal_builds else None
        self.launches: list[dict] = []

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, stream):
        mx.eval(inputs)
        self.launches.append(dict(grid=grid, threadgroup=threadgroup, n_inputs=len(inputs)))
        return run_kernel(self.language, self.kernel, **self.names, source=self.source, inputs=inputs,
                          template=template, grid=grid, threadgroup=threadgroup, output_shapes=output_shapes,
                          output_dtypes=output_dtypes)  # fmt: skip
