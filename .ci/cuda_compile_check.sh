#!/usr/bin/env bash
# Build fusedecode._C with its CUDA kernels for sm_80 and sm_90 against a CUDA build of torch, on a
# machine without a GPU, and check the machine code for both archs is in the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" numpy ninja setuptools wheel
fi
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
FUSEDECODE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py -q build_ext --build-temp "$BUILD/tmp" --build-lib "$BUILD/lib"
SO=$(ls "$BUILD"/lib/fusedecode/_C*.so)
CUOBJDUMP=$("$VENV/bin/python" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
ELVES=$("$CUOBJDUMP" --list-elf "$SO")
echo "$ELVES"
for arch in sm_80 sm_90; do
  echo "$ELVES" | grep -q "$arch" || { echo "missing $arch machine code in $SO"; exit 1; }
done
"$CUOBJDUMP" --dump-resource-usage "$SO" | grep -E "REG|Function" | sed -E 's/^ +//' | paste - - | \
  awk '{print $2, $3, $4, $7}' | sed 's/_ZN10fusedecode4cuda//'
echo "CUDA compile check passed: sm_80 and sm_90 in $(basename "$SO")"
