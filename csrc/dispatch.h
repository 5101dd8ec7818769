// The one dispatch over the floating-point dtypes the kernels read (logits, draft probabilities),
// shared by the CPU and CUDA bindings; each names its own 16-bit types (c10's on CPU, cuda_fp16's
// and cuda_bf16's on CUDA).
#pragma once

#include <ATen/ATen.h>

namespace fusedecode {

// Calls f(float{}), f(Half{}) or f(BFloat16{}) for `dtype`; any other dtype fails naming `what`.
template <typename Half, typename BFloat16, class F>
void dispatch_float_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(Half{});
    case at::kBFloat16:
      return f(BFloat16{});
    default:
      TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace fusedecode
