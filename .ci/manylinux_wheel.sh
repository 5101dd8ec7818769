#!/usr/bin/env bash
# manylinux CUDA wheels, inside a PyTorch manylinux builder image (it has the CUDA toolkit and the
# CPython versions under /opt/python). Not run by CI here (no container engine on the CI machine):
#
#   docker run --rm -v "$PWD":/src -w /src pytorch/manylinux2_28-builder:cuda13.0 \
#       bash .ci/manylinux_wheel.sh cp311-cp311 2.14.1 "8.0;8.6;8.9;9.0+PTX"
#
# auditwheel repair tags the wheel manylinux_2_28 but leaves out libtorch/libc10/libcudart and the
# other libraries that the user's torch install provides, as PyTorch-ecosystem projects do: bundling
# them would load a second copy of torch's runtime.
set -euo pipefail
ABI=${1:?python ABI tag, e.g. cp311-cp311}
TORCH=${2:?torch version, e.g. 2.14.1}
ARCHS=${3:-8.0;8.6;8.9;9.0+PTX}
PY=/opt/python/$ABI/bin/python
git config --global --add safe.directory "$PWD" 2>/dev/null || true
"$PY" -m pip install -q "torch==$TORCH" numpy ninja "setuptools>=77" wheel auditwheel
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-$(nproc)}
DIST=$PWD/dist/raw bash .ci/build_wheel.sh cuda "$PY"
EXCLUDES=()
for lib in libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so libc10.so libc10_cuda.so \
           libcudart.so.13 libcudart.so.12 libgomp.so.1 libshm.so; do
  EXCLUDES+=(--exclude "$lib")
done
"$PY" -m auditwheel repair --plat manylinux_2_28_x86_64 "${EXCLUDES[@]}" -w dist/ dist/raw/*.whl
ls -l dist/*.whl
