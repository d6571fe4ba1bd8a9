"""Compile the CUDA kernels' full source with NVRTC the way MLX's CUDA back-end does; no GPU needed.

MLX (``compile`` in ``mlx/backend/cuda/jit_module.cpp``) hands NVRTC the
source, its JIT headers by name (``mlx/backend/cuda/device/*.cuh``, embedded in
``libmlx.so`` as strings), ``--device-as-default-execution-space``,
``--gpu-architecture`` for the device, and include paths for the wheel's
``include`` and ``include/cccl`` and the CUDA runtime headers. Here they come
from pip, unpacked into a cache directory, never into the project's venv:

    pip download --no-deps -d DL mlx-cuda-12==0.32.4 nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
    for w in DL/*.whl; do unzip -q -o $w -d $RMSPROP_BENCH_NVRTC_SITE; done

The JIT headers are read back out of ``libmlx.so``: each is a NUL-terminated
string, matched to its name (``utils.cuh`` and what it includes) by content.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

#: The unpacked wheels (mlx/, nvidia/) of mlx-cuda-12 0.32.4, nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12.
SITE = Path(os.environ.get("RMSPROP_BENCH_NVRTC_SITE", "/tmp/rmsprop_bench_nvrtc/site"))
#: The headers the rmsprop kernels' source reaches: the default header and what it includes.
JIT_HEADERS = {
    "mlx/backend/cuda/device/utils.cuh": "This file must not include any host-only code",
    "mlx/backend/cuda/device/config.h": "#define MAX_NDIM",
    "mlx/backend/cuda/device/complex.cuh": "using complex64_t = complex_t<float>;",
}
#: H100: compute capability 9.0, which MLX targets as sm_90a (compute_90a where NVRTC cannot emit SASS).
ARCH = "--gpu-architecture=compute_90a"


def unavailable() -> str | None:
    """Why the check cannot run here, or None."""
    for need in ("nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "mlx/lib/libmlx.so", "nvidia/cuda_runtime/include"):
        if not (SITE / need).exists():
            return f"{SITE / need} is missing (set RMSPROP_BENCH_NVRTC_SITE; see tests/gpu_host/nvrtc_check.py)"
    return None


def jit_headers() -> dict[str, str]:
    """MLX's CUDA JIT headers, as mlx-cuda-12's ``libmlx.so`` embeds them."""
    data = (SITE / "mlx/lib/libmlx.so").read_bytes()
    found = {}
    for name, marker in JIT_HEADERS.items():
        for m in re.finditer(re.escape(marker.encode()), data):
            start = data.rfind(b"\x00", 0, m.start()) + 1
            text = data[start : data.index(b"\x00", m.end())].decode()
            if "#pragma once" in text:
                found[name] = text
                break
        else:
            raise LookupError(f"{name} is not in {SITE / 'mlx/lib/libmlx.so'}")
    return found


def compile_cuda(source: str, kernel_names: list[str]) -> tuple[bool, str]:
    """``(compiled, log)`` for ``source`` holding ``kernel_names`` as MLX names them (``mlx::core::cu::...``)."""
    nvrtc = ctypes.CDLL(str(SITE / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
    headers = jit_headers()
    names = [n.encode() for n in headers]
    texts = [t.encode() for t in headers.values()]
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"rmsprop_step.cu", len(names),
          (ctypes.c_char_p * len(texts))(*texts), (ctypes.c_char_p * len(names))(*names)))  # fmt: skip
    for name in kernel_names:
        check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, f"mlx::core::cu::{name}".encode()))
    include = SITE / "mlx/include"
    args = ["--device-as-default-execution-space", ARCH, f"--include-path={include}",
            f"--include-path={include / 'cccl'}", f"--include-path={SITE / 'nvidia/cuda_runtime/include'}"]  # fmt: skip
    result = nvrtc.nvrtcCompileProgram(prog, len(args), (ctypes.c_char_p * len(args))(*(a.encode() for a in args)))
    size = ctypes.c_size_t()
    check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
    log = ctypes.create_string_buffer(size.value + 1)
    check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log))
    ptx_size = ctypes.c_size_t()
    if result == 0:
        check(nvrtc, nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size)))
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return result == 0 and ptx_size.value > 0, log.value.decode(errors="replace")


def check(nvrtc, status: int) -> None:
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {nvrtc.nvrtcGetErrorString(status).decode()}")
