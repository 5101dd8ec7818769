// Torch-side contract of fusedecode::logit_stats, shared by the CPU and CUDA bindings.
//
// The Python layer (python/fusedecode/_validation.py) is the one place that validates user input and
// names the offending argument. The op itself only re-checks its own contract with TORCH_CHECK,
// because it can also be reached directly through torch.ops.fusedecode.logit_stats.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "fusedecode/stats_state.h"

namespace fusedecode {

// The outputs of fusedecode::logit_stats by name: the fields of OUTPUTS in
// python/fusedecode/ops/logit_stats.py, in its order (the schema's in csrc/ops.cpp). One entry per
// row ([outer * inner]); token_logprob and topk_confidence are empty ([0]) when not asked for.
struct LogitStatsOutputs {
  at::Tensor logsumexp;
  at::Tensor entropy;
  at::Tensor varentropy;
  at::Tensor self_certainty;
  at::Tensor max_logprob;
  at::Tensor argmax;
  at::Tensor token_logprob;
  at::Tensor topk_confidence;

  // The schema's return value: the only place the fields have positions.
  using Returns =
      std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  Returns returns() const {
    return {logsumexp, entropy, varentropy, self_certainty, max_logprob, argmax, token_logprob, topk_confidence};
  }

  // Raw pointers for the framework-free kernels (nullptr for a field not asked for).
  StatsOutputPointers pointers(bool with_token, bool with_topk) {
    StatsOutputPointers out{};
    out.logsumexp = logsumexp.data_ptr<float>();
    out.entropy = entropy.data_ptr<float>();
    out.varentropy = varentropy.data_ptr<float>();
    out.self_certainty = self_certainty.data_ptr<float>();
    out.max_logprob = max_logprob.data_ptr<float>();
    out.argmax = argmax.data_ptr<int64_t>();
    out.token_logprob = with_token ? token_logprob.data_ptr<float>() : nullptr;
    out.topk_confidence = with_topk ? topk_confidence.data_ptr<float>() : nullptr;
    return out;
  }
};

constexpr int64_t kMaxTopK = 64;

// Rows are addressed as (outer, inner) with two strides, so a [B, T, V] slice with arbitrary leading
// strides is read in place.
struct RowLayout {
  int64_t outer_size;
  int64_t inner_size;
  int64_t outer_stride;
  int64_t inner_stride;
  int64_t vocab;
  int64_t num_rows() const { return outer_size * inner_size; }
  int64_t row_offset(int64_t row) const {
    return (row / inner_size) * outer_stride + (row % inner_size) * inner_stride;
  }
};

inline RowLayout check_logit_stats_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& temperature,
                                          const c10::optional<at::Tensor>& token_ids, int64_t topk) {
  TORCH_CHECK(logits.dim() == 3, "fusedecode::logit_stats expects logits viewed as [outer, inner, V]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "logits must be float32, float16 or bfloat16");
  TORCH_CHECK(logits.size(2) >= 1, "logits must have V >= 1");
  TORCH_CHECK(logits.size(2) < (int64_t{1} << 31), "logits: V must be below 2^31");
  TORCH_CHECK(logits.size(2) == 1 || logits.stride(2) == 1, "logits: the last dimension must be contiguous");
  TORCH_CHECK(topk >= 0 && topk <= kMaxTopK, "topk must be in [0, 64]");
  const int64_t rows = logits.size(0) * logits.size(1);
  if (temperature.has_value()) {
    TORCH_CHECK(temperature->scalar_type() == at::kFloat && temperature->is_contiguous() &&
                    temperature->numel() == rows && temperature->device() == logits.device(),
                "temperature must be a contiguous float32 tensor with one entry per row, on the logits' device");
  }
  if (token_ids.has_value()) {
    TORCH_CHECK(token_ids->scalar_type() == at::kLong && token_ids->is_contiguous() && token_ids->numel() == rows &&
                    token_ids->device() == logits.device(),
                "token_ids must be a contiguous int64 tensor with one entry per row, on the logits' device");
  }
  RowLayout layout;
  layout.outer_size = logits.size(0);
  layout.inner_size = logits.size(1);
  layout.outer_stride = logits.stride(0);
  layout.inner_stride = logits.stride(1);
  layout.vocab = logits.size(2);
  return layout;
}

// Fresh outputs of `shape` on the logits' device: logit_stats' are one entry per row, in row order
// ([outer * inner]; the Python layer gives them the leading shape), verify_tree's one per node [B, N].
inline LogitStatsOutputs allocate_logit_stats_outputs(const at::Tensor& logits, at::IntArrayRef shape, bool with_token,
                                                      bool with_topk) {
  const auto f32 = logits.options().dtype(at::kFloat);
  auto optional_out = [&](bool wanted) { return wanted ? at::empty(shape, f32) : at::empty({0}, f32); };
  LogitStatsOutputs outputs;
  outputs.logsumexp = at::empty(shape, f32);
  outputs.entropy = at::empty(shape, f32);
  outputs.varentropy = at::empty(shape, f32);
  outputs.self_certainty = at::empty(shape, f32);
  outputs.max_logprob = at::empty(shape, f32);
  outputs.argmax = at::empty(shape, logits.options().dtype(at::kLong));
  outputs.token_logprob = optional_out(with_token);
  outputs.topk_confidence = optional_out(with_topk);
  return outputs;
}

}  // namespace fusedecode
