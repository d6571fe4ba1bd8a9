#!/usr/bin/env bash
# The sanitizer lane: the cpu_kernel extension built with AddressSanitizer + UndefinedBehaviorSanitizer
# and, separately, with ThreadSanitizer (for the thread pool), each running the kernel tests, the
# hypothesis fuzz of the entry point (tests/test_cpu_kernel_fuzz.py) and the differential test of
# programs (tests/test_programs.py) with more examples than the README's tests run.
#
# A Python extension cannot bring its own sanitizer runtime: the runtime must be the first library
# the process loads, and python3 is not built with it. So each run preloads it, with libstdc++
# (python3 does not link it, and the runtime's __cxa_throw interceptor needs it at start-up, or the
# first C++ exception, such as MLX's StopIteration, aborts):
#   LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)" python -m pytest ...
#   LD_PRELOAD="$(gcc -print-file-name=libtsan.so) $(g++ -print-file-name=libstdc++.so.6)" python -m pytest ...
# (ASan's build links UBSan too.) Leak detection is off: the interpreter and MLX keep their
# allocations until exit, on purpose. -s: a sanitizer report ends the process, and pytest's
# capture would lose it.
#
#   ci/sanitizers/run.sh                  # both builds, about 14 minutes
#   RMSPROP_SANITIZER_DIR=/tmp/x          # where the builds go (kept between runs)
#   RMSPROP_SANITIZERS=tsan               # one lane only (default: "asan tsan")
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${RMSPROP_SANITIZER_DIR:-/tmp/rmsprop-sanitizers}
PY=$PWD/.venv/bin/python
mkdir -p "$W"
start=$(date +%s)
say() { echo "[sanitizers $(($(date +%s) - start))s] $*"; }

[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[cpu,test]'; }

TESTS=(tests/test_cpu_kernel.py tests/test_cpu_kernel_paths.py tests/test_cpu_kernel_hardening.py tests/test_cpu_kernel_tree.py
  tests/test_cpu_kernel_rules.py tests/test_cpu_kernel_fuzz.py tests/test_programs.py)

lane() {  # name, -fsanitize= list, runtime library, fuzz examples, programs, extra pytest arguments...
  local name=$1 sanitize=$2 runtime=$3 examples=$4 programs=$5
  shift 5
  say "$name: building with -fsanitize=$sanitize"
  "$PY" - "$W/$name-ext" "$sanitize" <<'PY'
import sys
from pathlib import Path

from rmsprop_impls.kernels._cpu_ext.build import build_extension

cmake_args = [f"-DRMSPROP_SANITIZE={sys.argv[2]}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
print(build_extension(Path(sys.argv[1]), cmake_args=cmake_args))
PY
  say "$name: tests, fuzz with $examples examples, $programs programs"
  (RMSPROP_BENCH_CPU_EXT_DIR="$W/$name-ext" RMSPROP_FUZZ_EXAMPLES=$examples RMSPROP_PROGRAM_EXAMPLES=$programs \
    LD_PRELOAD="$(gcc -print-file-name="$runtime") $(g++ -print-file-name=libstdc++.so.6)" \
    "$PY" -m pytest -q -s -p no:cacheprovider --noconftest -o addopts= --hypothesis-show-statistics "$@" "${TESTS[@]}")
}

LANES=${RMSPROP_SANITIZERS:-asan tsan}
if [[ " $LANES " == *" asan "* ]]; then
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # 80 programs: about 2 minutes here (ASan runs them about 2.5x slower than a plain build).
  lane asan address,undefined libasan.so 300 80
  unset ASAN_OPTIONS UBSAN_OPTIONS
fi
if [[ " $LANES " == *" tsan "* ]]; then
  # die_after_fork=0: the fork test starts the child's pool threads, which TSan otherwise refuses.
  export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0:die_after_fork=0:suppressions=$PWD/ci/sanitizers/tsan.supp"
  # Under TSan the big-tree tests of test_cpu_kernel.py take minutes; the pool is exercised by the
  # two-thread tests, the fuzz and the programs (45: about 2 minutes, TSan being about 4x slower here);
  # of the rules' tests, the instruction sets' and AdamW's (in place, transforms).
  lane tsan thread libtsan.so 60 45 -k "thread or fuzz or fork or paths or hardening or programs or instruction or adamw"
fi
say "done"
