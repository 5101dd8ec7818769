#!/usr/bin/env bash
# The whole CPU suite (`make test`) on the newest releases: torch 2.15 (PyPI's Linux wheel is a CUDA
# build; it runs on CPU), triton 3.9 and the newest transformers, in its own venv (.venv-newest).
# It runs in a copy of the working tree (tracked and untracked, not ignored files), where the
# extension is built against that torch: the tree's own build (torch 2.13) is left alone.
#
# These machines' pip configuration caps torch at 2.14.1 with a constraint file. PIP_CONFIG_FILE=
# /dev/null lifts it for this script's installs alone (`PIP_CONSTRAINT=` and `pip --isolated` do not:
# the file still applies); packages then come from PyPI, not the local mirrors.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${NEWEST_VENV:-$ROOT/.venv-newest}
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV ;; esac   # make runs in the copy
TORCH_SPEC=${NEWEST_TORCH_SPEC:-torch==2.15.0}
TRITON_SPEC=${NEWEST_TRITON_SPEC:-triton==3.9.0}
TRANSFORMERS_SPEC=${NEWEST_TRANSFORMERS_SPEC:-transformers==5.25.0}
export PIP_CONFIG_FILE=/dev/null
# The CPU suite needs no CUDA kernels; with nvcc on PATH and a CUDA torch, `auto` would compile them.
export FUSEDECODE_BUILD_CUDA=${FUSEDECODE_BUILD_CUDA:-0}
start=$(date +%s)

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | \
  (cd "$ROOT" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) | \
  tar -C "$ROOT" --null -T - -c | tar -x -C "$SRC"

make -C "$SRC" install VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" TRITON_SPEC="$TRITON_SPEC" \
  TRANSFORMERS_SPEC="$TRANSFORMERS_SPEC"
"$VENV/bin/python" -c "import torch, triton, transformers; print('== torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
echo "== newest venv and build ready in $(( $(date +%s) - start ))s"
make -C "$SRC" test VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" TRITON_SPEC="$TRITON_SPEC" \
  TRANSFORMERS_SPEC="$TRANSFORMERS_SPEC"
echo "== CPU suite on $TORCH_SPEC, $TRITON_SPEC, $TRANSFORMERS_SPEC done in $(( $(date +%s) - start ))s"
