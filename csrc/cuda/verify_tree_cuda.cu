// Torch binding of verify_tree on CUDA: checks, outputs, the statistics pass (logit_stats kernel
// with kVerifySliceTokens-token slices, vocab_slices.h) and the tree walk, on the current stream.
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
  const int64_t splits = VocabSlices{vocab, kVerifySliceTokens}.count();
  TORCH_CHECK(splits <= cuda::kMaxVerifySlices, "verify_tree on CUDA supports V up to ",
              cuda::kMaxVerifySlices * kVerifySliceTokens, ", got ", vocab);
  const int64_t rows = batch * nodes;
  TORCH_CHECK(rows * splits < (int64_t{1} << 31), "target_logits: too many rows for one launch");
  const float stats_temperature = temperature > 0 ? static_cast<float>(temperature) : 1.f;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Pass 1: statistics of every node row, keeping one StatsState per kVerifySliceTokens-token slice.
  at::Tensor slices = at::empty({rows * splits * static_cast<int64_t>(sizeof(StatsState) / sizeof(float))},
                                logits.options().dtype(at::kFloat));
  at::Tensor counters = at::zeros({rows}, logits.options().dtype(at::kInt));
  cuda::LogitStatsParams s{};
  s.logits = logits.const_data_ptr();
  s.outer_size = batch;
  s.inner_size = nodes;
  s.outer_stride = logits.stride(0);
  s.inner_stride = logits.stride(1);
  s.vocab = vocab;
  s.temperature = stats_temperature;
  s.out = outputs.stats.pointers(false, false);
  s.splits = static_cast<int>(splits);
  s.partial_states = reinterpret_cast<StatsState*>(slices.data_ptr<float>());
  s.row_counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());

  cuda::VerifyTreeParams w{};
  w.logits = logits.const_data_ptr();
  w.stride_b = logits.stride(0);
  w.stride_n = logits.stride(1);
  w.vocab = vocab;
  w.nodes = nodes;
  w.tokens = tokens.const_data_ptr<int64_t>();
  w.parents = parents.const_data_ptr<int64_t>();
  w.seeds = seeds.const_data_ptr<int64_t>();
  w.inv_t = 1.f / stats_temperature;
  w.mode = verify_mode(temperature, draft_probs);
  w.max_logprob = outputs.stats.max_logprob.const_data_ptr<float>();
  w.argmax = outputs.stats.argmax.const_data_ptr<int64_t>();
  w.slices = s.partial_states;
  w.splits = static_cast<int>(splits);
  if (w.mode == kVerifyMultiDraft) {
    w.draft_probs = draft_probs->const_data_ptr();
    w.q_stride_b = draft_probs->stride(0);
    w.q_stride_n = draft_probs->stride(1);
  }
  w.num_accepted = outputs.num_accepted.data_ptr<int64_t>();
  w.accepted_nodes = outputs.accepted_nodes.data_ptr<int64_t>();
  w.output_tokens = outputs.output_tokens.data_ptr<int64_t>();
  w.width = depth + 1;

  dispatch_float_dtype<__half, __nv_bfloat16>(logits.scalar_type(), "target_logits", [&](auto logits_tag) {
    using T = decltype(logits_tag);
    s.vectors_per_split = kVerifySliceTokens / cuda::VecLoad<T>::kVec;
    C10_CUDA_CHECK(cuda::launch_logit_stats<T>(s, stream));
    if (w.mode != kVerifyMultiDraft) {
      C10_CUDA_CHECK((cuda::launch_tree_walk<T, float>(w, batch, stream)));
      return;
    }
    dispatch_float_dtype<__half, __nv_bfloat16>(draft_probs->scalar_type(), "draft_probs", [&](auto prob_tag) {
      using P = decltype(prob_tag);
      C10_CUDA_CHECK((cuda::launch_tree_walk<T, P>(w, batch, stream)));
    });
  });
  return outputs.returns();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedecode, CUDA, m) { m.impl("verify_tree", &verify_tree_cuda); }

}  // namespace fusedecode
