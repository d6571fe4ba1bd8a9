"""Builds the ``cpu_kernel`` variant's C++ extension with CMake, and installs the package without it if that fails.

Everything else about the package lives in ``pyproject.toml``. The extension
is optional: where there is no C++ compiler, ``pip install`` warns and goes
on, and ``cpu_kernel`` reports itself unavailable with the reason.
``RMSPROP_BENCH_NO_EXTENSION=1`` skips the build on purpose, for quick
throw-away installs (asv's environments, say).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION = "rmsprop_impls.kernels._cpu_ext._ext"
SOURCE_DIR = Path(__file__).resolve().parent / "rmsprop_impls" / "kernels" / "_cpu_ext"
SKIP_VARIABLE = "RMSPROP_BENCH_NO_EXTENSION"


class CMakeBuild(build_ext):
    """Runs ``rmsprop_impls/kernels/_cpu_ext/CMakeLists.txt``, which finds mlx and nanobind through this Python."""

    def run(self) -> None:
        self.skipped: list[str] = []
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get(SKIP_VARIABLE) == "1":
            self._skip(ext, f"{SKIP_VARIABLE}=1")
            return
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        configure = [
            "cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
        ]  # fmt: skip
        build = ["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]
        try:
            subprocess.run(configure, check=True)
            subprocess.run(build, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self._skip(ext, str(e))

    def _skip(self, ext: Extension, why: str) -> None:
        """Go on without the extension, and remove an older build of it that would still be installed."""
        self.skipped.append(ext.name)
        stale = [Path(self.get_ext_fullpath(ext.name))]
        if self.inplace or getattr(self, "editable_mode", False):
            stale.append(SOURCE_DIR / stale[0].name)
        for path in stale:
            path.unlink(missing_ok=True)
        self.warn(f"not building {ext.name} ({why}); the cpu_kernel variant will be unavailable")

    def copy_extensions_to_source(self) -> None:
        self.extensions = [ext for ext in self.extensions if ext.name not in self.skipped]
        super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        return [self.get_ext_fullpath(ext.name) for ext in self.extensions if ext.name not in self.skipped]


setup(ext_modules=[Extension(EXTENSION, sources=[])], cmdclass={"build_ext": CMakeBuild})
