// Stub of CUDA's <cuda_bf16.h> for the CPU emulation (tests/cuda_emulation/README.md).
#pragma once
#include "fdemu/cuda.h"
