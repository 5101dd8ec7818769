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

// logsumexp, entropy, varentropy, self_certainty, max_logprob, argmax, token_logprob, topk_confidence
using LogitStatsOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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

inline LogitStatsOutputs allocate_logit_stats_outputs(const at::Tensor& logits, bool with_token, bool with_topk) {
  // One entry per row, in row order ([outer * inner]); the Python layer gives them the leading shape.
  const auto shape = std::vector<int64_t>{logits.size(0) * logits.size(1)};
  const auto f32 = logits.options().dtype(at::kFloat);
  auto optional_out = [&](bool wanted) { return wanted ? at::empty(shape, f32) : at::empty({0}, f32); };
  return {at::empty(shape, f32),
          at::empty(shape, f32),
          at::empty(shape, f32),
          at::empty(shape, f32),
          at::empty(shape, f32),
          at::empty(shape, logits.options().dtype(at::kLong)),
          optional_out(with_token),
          optional_out(with_topk)};
}

// Raw pointers of the outputs for the framework-free kernels (nullptr for fields not asked for).
inline StatsOutputPointers logit_stats_output_pointers(LogitStatsOutputs& outputs, bool with_token, bool with_topk) {
  return {std::get<0>(outputs).data_ptr<float>(),
          std::get<1>(outputs).data_ptr<float>(),
          std::get<2>(outputs).data_ptr<float>(),
          std::get<3>(outputs).data_ptr<float>(),
          std::get<4>(outputs).data_ptr<float>(),
          std::get<5>(outputs).data_ptr<int64_t>(),
          with_token ? std::get<6>(outputs).data_ptr<float>() : nullptr,
          with_topk ? std::get<7>(outputs).data_ptr<float>() : nullptr};
}

}  // namespace fusedecode
