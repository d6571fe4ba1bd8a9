#!/usr/bin/env bash
# The aarch64 lane: cross-builds the cpu_kernel extension for aarch64 and runs its tests, the
# agreement tests and the property tests under qemu-aarch64-static, against the real aarch64
# mlx and mlx-cpu wheels. For a Debian x86-64 machine, as root (install.sh uses apt-get).
# Correctness only: timings under qemu mean nothing.
#
#   ci/emulation/run.sh            # everything, about 10 minutes
#   RMSPROP_EMULATION_DIR=/tmp/x   # where the wheels, the build and the launcher go (kept between runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
W=${RMSPROP_EMULATION_DIR:-/tmp/rmsprop-emulation}
MLX_VERSION=0.32.4
PY=python3.11
mkdir -p "$W"
start=$(date +%s)
say() { echo "[emulation $(($(date +%s) - start))s] $*"; }

say "installing qemu, the aarch64 cross compiler and libpython3.11:arm64"
ci/emulation/install.sh

# A native Python with nanobind: its CMake files drive the build (nanobind is compiled from source).
if [ ! -x "$W/host/bin/python" ]; then
  $PY -m venv "$W/host"
  "$W/host/bin/pip" install -q 'nanobind>=3' 'cmake>=3.24'
fi

# What the package imports and the tests need; the plotting and asv dependencies are not imported.
wheels=("mlx==$MLX_VERSION" "mlx-cpu==$MLX_VERSION" numpy tqdm platformdirs pytest hypothesis)
say "downloading the aarch64 wheels: ${wheels[*]}"
platforms=(--platform manylinux_2_35_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64)
if [ "$(cat "$W/site/.complete" 2>/dev/null)" != "${wheels[*]}" ]; then
  rm -rf "$W/site"
  "$W/host/bin/pip" install -q --target "$W/site" --only-binary=:all: "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 "${wheels[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  echo "${wheels[*]}" >"$W/site/.complete"
fi

say "the arm64 Python: headers with the aarch64 pyconfig.h, and a Py_BytesMain launcher"
rm -rf "$W/include" && mkdir -p "$W/include"
cp -r /usr/include/$PY "$W/include/"
cp /usr/include/aarch64-linux-gnu/$PY/pyconfig.h "$W/include/$PY/pyconfig.h"
aarch64-linux-gnu-gcc -O2 -I"$W/include/$PY" ci/emulation/launcher.c -o "$W/python3" \
  -L/usr/lib/aarch64-linux-gnu -l$PY

say "cross-building the extension"
# A fresh configure: a CMake cache left by a checkout elsewhere names that source directory and CMake refuses it.
rm -rf "$W/build"
"$W/host/bin/cmake" -S rmsprop_impls/kernels/_cpu_ext -B "$W/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$REPO/ci/emulation/aarch64-linux-gnu.cmake" \
  -DPython_EXECUTABLE="$W/host/bin/python" -DPython_INCLUDE_DIR="$W/include/$PY" \
  -DMLX_ROOT="$W/site/mlx/share/cmake/MLX" -DMLX_PY_VERSION=$MLX_VERSION >"$W/cmake.log"
"$W/host/bin/cmake" --build "$W/build" --parallel "$(nproc)" >>"$W/cmake.log"
rm -rf "$W/ext" && mkdir -p "$W/ext"
cp "$W"/build/_ext.*.so "$W/ext/_ext.cpython-311-aarch64-linux-gnu.so"
file "$W/ext/_ext.cpython-311-aarch64-linux-gnu.so" | grep -q aarch64

# The package's loader takes the aarch64 build from here.
export RMSPROP_BENCH_CPU_EXT_DIR="$W/ext"
src=$REPO

export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
export LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib:/usr/lib/aarch64-linux-gnu
export PYTHONHOME=/usr PYTHONPATH="$src:$W/site" PYTHONDONTWRITEBYTECODE=1
# mx.compile on the CPU compiles C++ with `g++` and caches the library under $TMPDIR/mlx: give the
# emulated MLX the cross compiler under that name, and a cache of its own (the native MLX's cached
# x86-64 libraries have the same names).
mkdir -p "$W/bin" "$W/tmp"
printf '#!/bin/sh\nexec aarch64-linux-gnu-g++ "$@"\n' >"$W/bin/g++"
chmod +x "$W/bin/g++"
export PATH="$W/bin:$PATH" TMPDIR="$W/tmp"
run() { (cd "$src" && qemu-aarch64-static "$W/python3" -S "$@"); }

run -c "
import platform, mlx.core as mx
from rmsprop_impls.kernels import _cpu_ext
assert platform.machine() == 'aarch64', platform.machine()
assert _cpu_ext._ext.kernels() == ['neon', 'scalar'], _cpu_ext._ext.kernels()
print('aarch64 python', platform.python_version(), 'mlx', mx.__version__, 'kernels', _cpu_ext._ext.kernels())"

say "tests under qemu"
# --noconftest: the shared fixtures build asv histories, which none of these tests use. The two
# tests that start a child Python are left out: without binfmt registration the child, an aarch64
# executable, cannot be exec'd from inside qemu.
run -m pytest -q -p no:cacheprovider --noconftest -o addopts= --durations=12 \
  tests/test_cpu_kernel.py tests/test_cpu_kernel_*.py --ignore tests/test_cpu_kernel_rules.py \
  tests/test_agreement.py -k "cpu_kernel or properties" \
  --deselect "tests/test_cpu_kernel_hardening.py::test_a_forked_child_runs_steps_on_a_fresh_pool" \
  --deselect "tests/test_cpu_kernel_hardening.py::test_shapeless_compile_replayed_on_mismatched_sizes_raises_instead_of_corrupting_memory" \
  tests/test_properties.py
# Every rule's kernels on NEON and the scalar loop (one step each, special values included), AdamW's
# in-place and transform tests, and the generated headers: the grid of many steps adds nothing here.
run -m pytest -q -p no:cacheprovider --noconftest -o addopts= tests/test_cpu_kernel_rules.py \
  -k "instruction or adamw or headers or generated_kernel or runs_the_generated"
say "done"
