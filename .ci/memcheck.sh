#!/usr/bin/env bash
# Memory check of the cpp backend on invalid and hostile input (verify_tree with validate=False,
# far-entry rows): tests/support/memcheck_invalid_inputs.py under valgrind memcheck. Fails on any invalid
# read or write, or use of uninitialised memory, with a frame in fusedecode's extension; the noise
# of the dynamic loader, Python and torch is reported but not counted. About 3 minutes on 2 cores.
#
#   bash .ci/memcheck.sh            # uses .venv (make install first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
command -v valgrind > /dev/null || { echo "memcheck: valgrind not installed"; exit 1; }
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# Large redzones: a read past the end of a tensor lands in them, not in the next allocation.
PYTHONMALLOC=malloc OMP_NUM_THREADS=2 valgrind --tool=memcheck --redzone-size=1024 --error-limit=no \
  --num-callers=40 --log-file="$LOG" "$PY" tests/support/memcheck_invalid_inputs.py --device cpu --trials "${MEMCHECK_TRIALS:-12}"
"$PY" - "$LOG" <<'PY'
import re
import sys

text = open(sys.argv[1]).read()
blocks = re.split(r"\n==\d+== \n", text)
ours = [b for b in blocks if re.search(r"^==\d+== +(at|by) .*(_C\.cpython|fusedecode::)", b, re.M)
        and re.search(r"Invalid (read|write)|uninitialised|Conditional jump|Invalid free", b)]
total = len(re.findall(r"^==\d+== (Invalid (read|write)|Conditional jump|Use of uninitialised)", text, re.M))
print(f"memcheck: {len(ours)} errors in fusedecode's extension ({total} in all, the rest in the loader / Python / torch)")
for block in ours[:5]:
    print(block)
sys.exit(1 if ours else 0)
PY
