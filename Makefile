# fusedecode developer commands. `make test` and `make demo` work on a fresh machine with Python 3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fusedecode-deps
# CPU torch for development and CI; triton for the Triton interpreter and ahead-of-time compiles.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# The Hugging Face integration (fusedecode.hf, the demo) is tested against this transformers.
TRANSFORMERS_SPEC ?= transformers==5.17.0

.PHONY: FORCE install test hf-compat newest-check demo bench sweep cuda-check cuda-check-2.15 cuda-emulated device-check train-bundled mutation wheel wheel-cpu wheel-py sdist clean

$(DEPS_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" "$(TRANSFORMERS_SPEC)" numpy pytest pytest-benchmark \
		ninja "setuptools>=77" wheel matplotlib
	touch $@

# `pip install -e .` compiles the extension from scratch in a fresh temporary directory every time
# (about 5 minutes on 2 cores), so it runs only when the build's inputs changed since the last build
# (a dependency install, which an edit of this Makefile triggers, counts), or the built extension is
# gone. An edit to Python code needs no reinstall: the install is editable. Build switches given in
# the environment (FUSEDECODE_BUILD_CUDA, ...) are not inputs: after changing one, `make clean`.
BUILD_STAMP := $(VENV)/.fusedecode-build
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu' \))
$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS) $(if $(wildcard python/fusedecode/_C*.so),,FORCE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

FORCE:

install: $(BUILD_STAMP)

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# The HF tests against transformers 4.57 and the newest release, one venv each (.ci/hf_compat.sh).
hf-compat: install
	bash .ci/hf_compat.sh

# The whole CPU suite on the newest torch (2.15, PyPI's CUDA build run on CPU), triton (3.9) and
# transformers, in .venv-newest, from a copy of the tree (.ci/newest_check.sh).
newest-check:
	bash .ci/newest_check.sh

demo: install
	$(PY) -m fusedecode demo

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-only

sweep: install
	$(PY) benchmarks/sweep.py --json benchmarks/results/sweep.json --plot benchmarks/results/sweep.png

# Build the CUDA wheel (sm_80, sm_90) against a CUDA torch, check it, test the installed copy (no GPU needed).
cuda-check:
	bash .ci/cuda_wheel_check.sh
# The same against torch 2.15 (PyPI's CUDA 13.2 build): fusedecode-...+cu132torch2.15.
cuda-check-2.15:
	CUDA_TORCH_SPEC=torch==2.15.0 bash .ci/cuda_wheel_check.sh

# The CUDA kernels executed on the CPU (tests/cuda_emulation/README.md), under every thread schedule.
# Installs only when fusedecode's extension is missing (a reinstall rebuilds it: minutes); after
# changing csrc/cpu, run make install first (the emulator itself is always built from the sources).
EMULATION_SCHEDULES ?= all
cuda-emulated: $(DEPS_STAMP)
	$(PY) -c "import fusedecode._C" 2>/dev/null || $(MAKE) install
	FUSEDECODE_EMULATION_SCHEDULES=$(EMULATION_SCHEDULES) $(PY) -m pytest -q tests/cuda_emulation

# Wheels from a clean export of HEAD into dist/ (see README "Wheels for clusters"). WHEEL_PYTHON
# must hold the torch to build against: a CUDA build of torch for `wheel`.
WHEEL_PYTHON ?= $(PY)
wheel:
	bash .ci/build_wheel.sh cuda $(WHEEL_PYTHON)
wheel-cpu:
	bash .ci/build_wheel.sh cpu $(WHEEL_PYTHON)
wheel-py:
	bash .ci/build_wheel.sh py $(WHEEL_PYTHON)
sdist:
	bash .ci/build_wheel.sh sdist $(WHEEL_PYTHON)

# Retrain the bundled arithmetic models (about 25 minutes on a busy 2-core machine, one thread).
train-bundled: install
	$(PY) -m fusedecode.demo.train_bundled

# Apply the curated plausible bugs of tests/mutation/mutations.py one at a time and report the
# kill rate and the survivors (about 15 minutes; not part of CI).
mutation: install
	$(PY) -m tests.mutation.run

device-check: install
	bash benchmarks/device_check.sh

clean:
	rm -rf build dist *.egg-info python/fusedecode/_C*.so python/fusedecode/_build_meta.py $(BUILD_STAMP)
