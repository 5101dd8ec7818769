// Stub of CUDA's <cuda_fp16.h> for the CPU emulation (tests/cuda_emulation/README.md).
#pragma once
#include "fdemu/cuda.h"
