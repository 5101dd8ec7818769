#!/usr/bin/env bash
# fusedecode.hf against transformers 4.5x (make test covers 5.x): a second venv, the HF tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF4_VENV:-.venv-hf4}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers==4.57.6" numpy pytest setuptools wheel ninja
fi
# The extension built by `make test` (same torch) is reused; nothing is compiled again.
FUSEDECODE_SKIP_NATIVE=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf.py
