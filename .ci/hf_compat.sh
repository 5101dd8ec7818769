#!/usr/bin/env bash
# fusedecode.hf against transformers 4.5x (make test covers 5.x): a second venv, the HF tests only.
# It imports fusedecode from the source tree, with the extension `make test` built (same torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF4_VENV:-.venv-hf4}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers==4.57.6" numpy pytest
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
PYTHONPATH=python "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_tree_speculative.py tests/test_srgen.py
