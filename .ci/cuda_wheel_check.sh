#!/usr/bin/env bash
# On a machine without a GPU: build the CUDA wheel (sm_80 and sm_90) from a clean export of HEAD
# against a CUDA build of torch, check the machine code of both archs is inside, install the wheel
# into a fresh virtual environment and run the CPU tests against the installed copy.
#
# CUDA_TORCH_SPEC picks the torch to build against (default torch==2.14.1; `make cuda-check-2.15`
# passes torch==2.15.0). These machines' pip configuration caps torch at 2.14.1 with a constraint
# file: for a newer torch it is lifted for this script's installs alone (PIP_CONFIG_FILE=/dev/null).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
TORCH_MINOR=$(echo "$CUDA_TORCH_SPEC" | sed -nE 's/^torch==([0-9]+\.[0-9]+)(\..*)?$/\1/p')
[ -n "$TORCH_MINOR" ] || { echo "CUDA_TORCH_SPEC must be torch==X.Y[.Z], got $CUDA_TORCH_SPEC"; exit 2; }
if [ "$(printf '%s\n' 2.14 "$TORCH_MINOR" | sort -V | tail -1)" != 2.14 ]; then
  export PIP_CONFIG_FILE=/dev/null
fi
if [ "$TORCH_MINOR" = 2.14 ]; then VENV=${CUDA_VENV:-.venv-cuda}; else VENV=${CUDA_VENV:-.venv-cuda-$TORCH_MINOR}; fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$CUDA_TORCH_SPEC" numpy ninja "setuptools>=77" wheel
fi
echo "== build venv ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)')) ready in $(( $(date +%s) - start ))s"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DIST="$WORK/dist" TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} bash .ci/build_wheel.sh cuda "$VENV/bin/python"
WHEEL=$(ls "$WORK"/dist/*.whl)
# The local version names the CUDA of the torch built against: PyPI's torch 2.14.1 is a CUDA 13.0
# build, its 2.15.0 a CUDA 13.2 one (nvcc 13.0 compiles for both: same CUDA major).
case "$TORCH_MINOR" in
  2.14) EXPECTED_LOCAL=cu130torch2.14 ;;
  2.15) EXPECTED_LOCAL=cu132torch2.15 ;;
  *) EXPECTED_LOCAL=${CUDA_WHEEL_LOCAL:?set CUDA_WHEEL_LOCAL to the local version expected for torch $TORCH_MINOR} ;;
esac
case "$(basename "$WHEEL")" in
  fusedecode-*+${EXPECTED_LOCAL}-*.whl) ;;
  *) echo "unexpected wheel name: $WHEEL"; exit 1 ;;
esac
unzip -q -o "$WHEEL" 'fusedecode/_C*.so' -d "$WORK/unpacked"
SO=$(ls "$WORK"/unpacked/fusedecode/_C*.so)
CUOBJDUMP=$("$VENV/bin/python" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
ELVES=$("$CUOBJDUMP" --list-elf "$SO")
echo "$ELVES"
for arch in sm_80 sm_90; do
  echo "$ELVES" | grep -q "$arch" || { echo "missing $arch machine code in $(basename "$WHEEL")"; exit 1; }
done
"$CUOBJDUMP" --dump-resource-usage "$SO" | grep -E "REG|Function" | sed -E 's/^ +//' | paste - - | \
  awk '{print $2, $3, $4}' | sed 's/_ZN10fusedecode4cuda//' | sort -u
echo "wheel $(basename "$WHEEL"): sm_80 and sm_90 machine code present ($(( $(date +%s) - start ))s)"
# CI (.ci/run) is short of disk: the build environment (a CUDA torch, 5.5 GB) goes before the test
# environment installs its own copy.
if [ "${CUDA_DROP_BUILD_VENV:-0}" = 1 ]; then
  rm -rf "$VENV"
fi

# A fresh environment: the wheel and what its metadata asks for (torch $TORCH_MINOR.x), nothing from the tree.
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL" pytest "transformers==5.17.0"
cp -r "$ROOT/tests" "$WORK/tests"
cp -r "$ROOT/examples" "$WORK/examples"  # the Hub custom_generate folders tests/hf/test_hub.py loads
mkdir -p "$WORK/benchmarks"  # the evaluation scripts tests/hf/test_reflection.py runs against the wheel
cp "$ROOT"/benchmarks/eval_*.py "$WORK/benchmarks/"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import fusedecode
assert "site-packages" in fusedecode.__file__, fusedecode.__file__
info = fusedecode.build_info()
assert info["native"] and info["with_cuda"], info
print("installed:", fusedecode.__file__, info["version"], "CUDA archs", info["cuda_archs"])
PY
# CPU tests against the installed wheel (the Triton interpreter and ahead-of-time tests ran in make test;
# tree speculation is pure Python, tested in make test and .ci/hf_compat.sh).
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests -k "not aot" --ignore=tests/hf/test_tree_speculative.py
echo "CUDA wheel check passed ($(basename "$WHEEL"), $(( $(date +%s) - start ))s)"
