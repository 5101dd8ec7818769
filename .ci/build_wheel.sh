#!/usr/bin/env bash
# Build one fusedecode wheel (or the sdist) from a clean export of HEAD, with the python given.
#
#   .ci/build_wheel.sh cuda  [PYTHON]   # +cu<XY>torch<A.B>: C++ and CUDA kernels for TORCH_CUDA_ARCH_LIST
#   .ci/build_wheel.sh cpu   [PYTHON]   # +cputorch<A.B>: C++ kernels only
#   .ci/build_wheel.sh py    [PYTHON]   # pure Python (Triton and torch backends)
#   .ci/build_wheel.sh sdist [PYTHON]   # source distribution, builds on the user's machine
#
# PYTHON (default python3) must have torch (a CUDA build for `cuda`), setuptools, wheel and ninja.
# No GPU is needed. Environment: TORCH_CUDA_ARCH_LIST (default 8.0;8.6;8.9;9.0+PTX), MAX_JOBS,
# NVCC_THREADS, CUDA_HOME, DIST (output folder, default dist/).
set -euo pipefail
KIND=${1:?cuda, cpu, py or sdist}
PY=${2:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # survives the cd below
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIST=${DIST:-$ROOT/dist}
mkdir -p "$DIST"
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git -C "$ROOT" archive HEAD | tar -x -C "$SRC"   # committed files only: a clean checkout
cd "$SRC"
case "$KIND" in
  cuda) export FUSEDECODE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX} ;;
  cpu) export FUSEDECODE_BUILD_CUDA=0 ;;
  py) export FUSEDECODE_SKIP_NATIVE=1 ;;
  sdist) export FUSEDECODE_SKIP_NATIVE=1 ;;
  *) echo "unknown kind $KIND" >&2; exit 2 ;;
esac
start=$(date +%s)
if [ "$KIND" = sdist ]; then
  "$PY" setup.py -q sdist -d "$DIST"
else
  "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$DIST"
fi
echo "built $KIND in $(( $(date +%s) - start ))s:"
ls -t "$DIST" | head -1
