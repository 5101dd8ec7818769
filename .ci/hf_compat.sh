#!/usr/bin/env bash
# fusedecode.hf against the other transformers releases it supports (`make test` covers the pinned
# 5.17): the last 4.x (4.57) and the newest release (5.25; 5.24 made past_key_values cache). One
# venv each with the HF tests only; they import fusedecode from the source tree, with the extension
# `make test` built (same torch).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HF_TESTS=(tests/hf tests/demo)  # every test of fusedecode.hf and of the demo on the bundled models

check_against() {  # check_against VENV TRANSFORMERS_VERSION
  local venv=$1 version=$2 start
  start=$(date +%s)
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "$TORCH_SPEC" "transformers==$version" numpy pytest
  fi
  if ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('fusedecode')" 2>/dev/null; then
    # transformers checks a custom_generate folder's requirements.txt (fusedecode among them) against
    # the installed distributions: install the pure-Python wheel for that (imports stay on the tree).
    local wheels
    wheels=$(mktemp -d)
    "$venv/bin/python" -m pip install -q "setuptools>=77" wheel
    DIST="$wheels" bash .ci/build_wheel.sh py "$venv/bin/python" >/dev/null
    "$venv/bin/python" -m pip install -q --no-deps "$wheels"/*.whl
    rm -rf "$wheels"
  fi
  "$venv/bin/python" -c "import transformers; print('== transformers', transformers.__version__)"
  PYTHONPATH=python "$venv/bin/python" -m pytest -q -p no:cacheprovider "${HF_TESTS[@]}"
  echo "== transformers $version checked in $(( $(date +%s) - start ))s"
}

check_against "${HF4_VENV:-.venv-hf4}" "${HF4_VERSION:-4.57.6}"
check_against "${HF_NEWEST_VENV:-.venv-hf-newest}" "${HF_NEWEST_VERSION:-5.25.0}"
