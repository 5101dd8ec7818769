#!/usr/bin/env bash
# fusedecode.vllm on a GPU with vLLM installed (not on the lent device machines: they have no vLLM).
# Runs the engine tests under Model Runner V2 (vLLM's default; forced here so a fallback cannot pass
# unnoticed), then benchmarks/bench_vllm.py: tokens/s of plain vLLM vs fusedecode statistics vs
# logprobs=20, on the bundled target and, with --model, on a real model.
#
#   pip install --no-build-isolation -e .            # fusedecode with its CUDA kernels
#   bash benchmarks/vllm_gpu_check.sh OUT_DIR [--model /path/to/Qwen2.5-0.5B-Instruct]
set -euo pipefail
OUT=${1:?usage: vllm_gpu_check.sh OUT_DIR [--model PATH]}
shift
MODEL=""
if [ "${1:-}" = "--model" ]; then
  MODEL=${2:?--model needs a path}
fi
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
"$PYTHON" -c "import torch, vllm; assert torch.cuda.is_available(), 'no GPU'; print('vLLM', vllm.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
VLLM_USE_V2_MODEL_RUNNER=1 "$PYTHON" -P -m pytest -q -p no:cacheprovider tests/vllm 2>&1 | tee "$OUT/vllm-engine-tests.txt"
echo "== engine tests under Model Runner V2: $(( $(date +%s) - start ))s"
"$PYTHON" -P benchmarks/bench_vllm.py --out "$OUT/vllm-bundled.md"
if [ -n "$MODEL" ]; then
  "$PYTHON" -P benchmarks/bench_vllm.py --model "$MODEL" --traces 64 --max-tokens 256 --out "$OUT/vllm-model.md"
fi
echo "== done in $(( $(date +%s) - start ))s; results in $OUT"
