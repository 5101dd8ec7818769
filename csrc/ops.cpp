// Schemas of the fusedecode custom ops and the Python module fusedecode._C (build facts only: the
// ops themselves are reached through torch.ops.fusedecode).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "fusedecode/vocab_slices.h"
#include "verify_tree_op.h"

#ifndef FUSEDECODE_TORCH_VERSION
#define FUSEDECODE_TORCH_VERSION "unknown"
#endif
#ifndef FUSEDECODE_CUDA_VERSION
#define FUSEDECODE_CUDA_VERSION ""
#endif
#ifndef FUSEDECODE_CUDA_ARCHS
#define FUSEDECODE_CUDA_ARCHS ""
#endif

// The return lists come from the C++ output lists (FUSEDECODE_LOGIT_STATS_OUTPUTS,
// FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS); tests/ops/test_registry.py checks the registered schemas
// against the Python op modules' SCHEMAS, built from their OUTPUTS.
TORCH_LIBRARY(fusedecode, m) {
  using fusedecode::schema_returns;
  m.def(("logit_stats(Tensor logits, Tensor? temperature, float temperature_scalar, Tensor? token_ids, int topk) -> " +
         schema_returns(fusedecode::logit_stats_output_names(/*always_only=*/false)))
            .c_str());
  m.def(("verify_tree(Tensor target_logits, Tensor draft_tokens, Tensor parents, float temperature, "
         "Tensor? draft_probs, Tensor seeds, int depth) -> " +
         schema_returns(fusedecode::verify_tree_output_names()))
            .c_str());
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(FUSEDECODE_TORCH_VERSION);
#ifdef FUSEDECODE_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = std::string(FUSEDECODE_CUDA_VERSION);
  info["cuda_archs"] = std::string(FUSEDECODE_CUDA_ARCHS);
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = std::string("");
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  info["cpu_simd"] = std::string("x86-64 baseline + x86-64-v3 (AVX2/FMA) clones");
#elif defined(__aarch64__)
  info["cpu_simd"] = std::string("aarch64 NEON");
#else
  info["cpu_simd"] = std::string("generic vector extensions");
#endif
  info["compiler"] = std::string(__VERSION__);
  // The Triton backend cuts rows the same way (tests/ops/verify_tree compares the two).
  info["verify_slice_tokens"] = fusedecode::kVerifySliceTokens;
  // The largest topk the native op accepts (tests/test_op_contract.py: equal to Python's MAX_TOPK).
  info["max_topk"] = fusedecode::kMaxTopK;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedecode native extension: build facts; the ops live in torch.ops.fusedecode";
  m.def("build_info", &build_info, "How this extension was built (torch, CUDA, archs, CPU SIMD)");
}
