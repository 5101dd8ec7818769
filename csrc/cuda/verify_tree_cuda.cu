// Torch binding of verify_tree on CUDA: checks, outputs and workspace, then launch_verify_tree
// (csrc/include/fusedecode/verify_tree.cuh: the statistics pass and the tree walk) on the current
// stream.
#include "fusedecode/verify_tree.cuh"
#include "../dispatch.h"
#include "../verify_tree_op.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace fusedecode {
namespace {

VerifyTreeOutputs::Returns verify_tree_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                            const at::Tensor& parents, double temperature,
                                            const c10::optional<at::Tensor>& draft_probs, const at::Tensor& seeds,
                                            int64_t depth) {
  TORCH_CHECK(logits.is_cuda(), "target_logits must be a CUDA tensor");
  check_verify_tree_inputs(logits, tokens, parents, temperature, draft_probs, seeds, depth);
  const c10::cuda::CUDAGuard guard(logits.device());
  VerifyTreeOutputs outputs = allocate_verify_tree_outputs(logits, depth);
  const int64_t batch = logits.size(0), nodes = logits.size(1), vocab = logits.size(2);
  if (batch == 0 || nodes == 0) return outputs.returns();
  TORCH_CHECK(cuda::verify_tree_splits(vocab) <= cuda::kMaxVerifySlices, "verify_tree on CUDA supports V up to ",
              cuda::kMaxVerifySlices * kVerifySliceTokens, ", got ", vocab);
  TORCH_CHECK(cuda::verify_tree_shape_supported(batch, nodes, vocab), "target_logits: too many rows for one launch");
  const int mode = verify_mode(temperature, draft_probs);

  cuda::VerifyTreeArgs a{};
  a.logits = logits.const_data_ptr();
  a.batch = batch;
  a.nodes = nodes;
  a.vocab = vocab;
  a.stride_b = logits.stride(0);
  a.stride_n = logits.stride(1);
  a.tokens = tokens.const_data_ptr<int64_t>();
  a.parents = parents.const_data_ptr<int64_t>();
  a.seeds = seeds.const_data_ptr<int64_t>();
  a.temperature = temperature;
  if (mode == kVerifyMultiDraft) {
    a.draft_probs = draft_probs->const_data_ptr();
    a.q_stride_b = draft_probs->stride(0);
    a.q_stride_n = draft_probs->stride(1);
  }
  a.stats = outputs.stats.pointers(false, false);
  a.num_accepted = outputs.num_accepted.data_ptr<int64_t>();
  a.accepted_nodes = outputs.accepted_nodes.data_ptr<int64_t>();
  a.output_tokens = outputs.output_tokens.data_ptr<int64_t>();
  a.width = depth + 1;
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::verify_tree_workspace_bytes(batch, nodes, vocab))},
                                   logits.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float_dtype<__half, __nv_bfloat16>(logits.scalar_type(), "target_logits", [&](auto logits_tag) {
    using T = decltype(logits_tag);
    if (mode != kVerifyMultiDraft) {
      C10_CUDA_CHECK((cuda::launch_verify_tree<T, float>(a, workspace.data_ptr(), stream)));
      return;
    }
    dispatch_float_dtype<__half, __nv_bfloat16>(draft_probs->scalar_type(), "draft_probs", [&](auto prob_tag) {
      using P = decltype(prob_tag);
      C10_CUDA_CHECK((cuda::launch_verify_tree<T, P>(a, workspace.data_ptr(), stream)));
    });
  });
  return outputs.returns();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedecode, CUDA, m) { m.impl("verify_tree", &verify_tree_cuda); }

}  // namespace fusedecode
