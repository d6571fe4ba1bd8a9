"""The ``cpu_kernel`` variant's C++ extension: ``rmsprop_cpu.cpp``, its CMake build and the compiled ``_ext``.

``setup.py`` builds ``_ext`` with the installed mlx wheel's headers and
libmlx. Importing this package fails with ``ImportError`` where the build was
skipped or where it was built against another mlx than the one running, since
MLX's C++ ABI is not stable across releases.
"""

import mlx.core as mx  # loads libmlx and registers mx.array with nanobind before _ext needs them

from ._ext import (
    EAGER_MAX_ELEMENTS,
    MLX_VERSION,
    donated_buffers,
    hardware_threads,
    huge_page_moves,
    rmsprop_update,
    uses_avx2,
)

if MLX_VERSION != mx.__version__:
    raise ImportError(f"it was built against mlx {MLX_VERSION} but mlx {mx.__version__} is running; reinstall it")

__all__ = [
    "EAGER_MAX_ELEMENTS",
    "donated_buffers",
    "hardware_threads",
    "huge_page_moves",
    "rmsprop_update",
    "uses_avx2",
]
