#!/usr/bin/env bash
# Usage: ci/package_with_extension.sh EXT_DIR SCRATCH -> prints the directory to put first on PYTHONPATH
# so that `rmsprop_impls` imports with the prebuilt _ext*.so in EXT_DIR (a cross or sanitizer build).
# The package's loader reads RMSPROP_BENCH_CPU_EXT_DIR; where it does not (yet), this copies the
# package (tracked and new files) to SCRATCH with the build put where the loader looks.
set -euo pipefail
ext_dir=$1 scratch=$2
cd "$(dirname "$0")/.."
if grep -q RMSPROP_BENCH_CPU_EXT_DIR rmsprop_impls/kernels/_cpu_ext/*.py; then
  pwd
  exit
fi
rm -rf "$scratch" && mkdir -p "$scratch"
git ls-files -z --cached --others --exclude-standard rmsprop_impls tests pyproject.toml | xargs -0 cp --parents -t "$scratch"
rm -f "$scratch"/rmsprop_impls/kernels/_cpu_ext/_ext*.so
cp "$ext_dir"/_ext*.so "$scratch/rmsprop_impls/kernels/_cpu_ext/"
echo "$scratch"
