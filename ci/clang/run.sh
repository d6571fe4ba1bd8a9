#!/usr/bin/env bash
# The clang lane: the cpu_kernel extension built with clang++ and its tests run on that build, then the host
# simulations of both GPU kernels compiled with clang++, as .ci/run's main lane does with GCC. Apple's g++ is
# clang, so GCC-only C++ (a builtin's feature names, an attribute GCC ignores) fails here before it reaches a Mac.
# Installs Debian's clang where it is missing (as root, with apt-get).
#
#   ci/clang/run.sh                 # about 2 minutes on 2 cores
#   RMSPROP_CLANG_DIR=/tmp/x        # where the build goes
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${RMSPROP_CLANG_DIR:-/tmp/rmsprop-clang}
PY=$PWD/.venv/bin/python
start=$(date +%s)
say() { echo "[clang $(($(date +%s) - start))s] $*"; }

if ! command -v clang++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null
  else
    echo "ci/clang/run.sh: clang++ is not installed (and cannot be installed here); skipping the clang lane" >&2
    exit 0
  fi
fi
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[cpu,test]'; }
export CXX=clang++ CC=clang
say "$(clang++ --version | head -1): building the cpu_kernel extension"
"$PY" -m rmsprop_impls.kernels._cpu_ext.build --out "$W/ext" 2>&1 | grep -v RuntimeWarning
grep -q "CXX compiler identification is Clang" "$W/ext/build.log"
say "cpu_kernel's tests and agreement on clang's build"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs)
RMSPROP_BENCH_CPU_EXT_DIR="$W/ext" "${PYTEST[@]}" tests/test_cpu_kernel.py tests/test_cpu_kernel_paths.py \
  tests/test_cpu_kernel_tree.py tests/test_cpu_kernel_hardening.py tests/test_cpu_kernel_rules.py
RMSPROP_BENCH_CPU_EXT_DIR="$W/ext" "${PYTEST[@]}" tests/test_agreement.py -k cpu_kernel
say "both GPU kernels' host simulations and the build's error line, compiled by clang++"
"${PYTEST[@]}" tests/test_gpu_host.py tests/test_extension_build.py::test_a_compile_error_is_the_compilers_first_error_line
say "done"
