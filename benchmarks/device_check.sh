#!/usr/bin/env bash
# Device check on a machine with an NVIDIA GPU: build with CUDA, run the GPU tests, run
# compute-sanitizer on the kernels, run the benchmark sweep, print a short table.
#
#   bash benchmarks/device_check.sh            # results in $OUT, or benchmarks/results/local
#
# Stages have their own time limits so a slow stage cannot eat the whole lease; whatever finished
# (at most 8 files: the device tool returns no more) is in the output folder.
# Commit the results under benchmarks/results/<gpu>-<date>/
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
log() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$SUMMARY"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$SUMMARY"
echo "commit ${FUSEDECODE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$SUMMARY"

log "build (CUDA, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
start=$(date +%s)
FUSEDECODE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 300 $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; fi
$PY -m fusedecode info | tee -a "$SUMMARY"

log "GPU tests"
# Includes the cuda-marked cases of tests/test_adversarial.py (hostile rows, validate=False fuzz).
timeout ${TEST_TIMEOUT:-300} $PY -m pytest tests -m cuda -q -p no:cacheprovider -W ignore > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$SUMMARY"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3 | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

log "compute-sanitizer memcheck"
timeout ${SANITIZER_TIMEOUT:-100} compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitizer_check.py \
  > "$OUT/sanitizer.log" 2>&1
echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)" | tee -a "$SUMMARY"
# Invalid input (verify_tree validate=False: draft tokens past the buffers, bad parents) and far rows.
timeout ${SANITIZER_TIMEOUT:-100} compute-sanitizer --tool memcheck --error-exitcode 9 $PY tests/support/memcheck_invalid_inputs.py \
  --device cuda >> "$OUT/sanitizer.log" 2>&1
echo "memcheck invalid inputs rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)" | tee -a "$SUMMARY"

log "sweep"
timeout ${SWEEP_TIMEOUT:-200} $PY benchmarks/sweep.py --dtypes bfloat16 float32 --replays ${REPLAYS:-10} \
  --json "$OUT/sweep.json" --plot "$OUT/sweep.png" > /tmp/fusedecode_sweep.log 2>&1
echo "sweep rc=$?" | tee -a "$SUMMARY"
grep -v '^{' /tmp/fusedecode_sweep.log | grep -v -i "warn\|capture_end" | tee -a "$SUMMARY"

log "verify_tree sweep"
timeout ${VERIFY_TIMEOUT:-200} $PY benchmarks/sweep_verify.py --replays ${REPLAYS:-10} --json "$OUT/sweep_verify.json" \
  > /tmp/fusedecode_sweep_verify.log 2>&1
echo "verify sweep rc=$?" | tee -a "$SUMMARY"
grep -v '^{' /tmp/fusedecode_sweep_verify.log | grep -v -i "warn\|capture_end" | tee -a "$SUMMARY"

log "UncertaintyProcessor overhead in generate (Qwen2-0.5B-shaped, random weights)"
timeout ${HF_TIMEOUT:-150} $PY benchmarks/bench_hf.py --qwen2-0.5b --device cuda --repeats 5 \
  --json "$OUT/bench_hf.json" 2>&1 | grep -v '^{' | grep -v -i "warn\|loading" | tee -a "$SUMMARY"

log "linear_cross_entropy_entropy: one SRGen correction, naive vs fused (T=8192, V=151936, H=896, bf16)"
timeout ${LINEAR_CE_TIMEOUT:-120} $PY benchmarks/bench_linear_ce.py --device cuda 2>&1 \
  | grep -v -i "warn" | tee -a "$SUMMARY"

log "scoring without [T, V] logits: materialised + logit_stats vs linear_logit_stats (Qwen2-7B head, bf16)"
timeout ${SCORING_TIMEOUT:-90} $PY benchmarks/bench_scoring.py --device cuda --json "$OUT/bench_scoring.json" 2>&1 \
  | grep -v -i "warn" | tee -a "$SUMMARY"

log "speculative decoding on the GPU: plain vs HF assisted vs tree speculation (bundled pair)"
timeout ${SPECULATIVE_TIMEOUT:-90} $PY benchmarks/bench_speculative.py --device cuda --problems 12 2>&1 \
  | grep '^|' | tee -a "$SUMMARY"

log "compute-sanitizer racecheck"
timeout ${RACECHECK_TIMEOUT:-80} compute-sanitizer --tool racecheck --error-exitcode 9 $PY benchmarks/sanitizer_check.py \
  >> "$OUT/sanitizer.log" 2>&1
echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)" | tee -a "$SUMMARY"
log "done"
