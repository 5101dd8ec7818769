// Torch-side contract of fusedecode::logit_stats, shared by the CPU and CUDA bindings.
//
// The Python layer (python/fusedecode/ops/logit_stats/checks.py) is the one place that validates user input and
// names the offending argument. The op itself only re-checks its own contract with TORCH_CHECK,
// because it can also be reached directly through torch.ops.fusedecode.logit_stats.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fusedecode/stats_state.h"

namespace fusedecode {

// Tensor tuples of a schema's return value: std::tuple<at::Tensor, ...> with `n` entries.
template <size_t n>
using TensorTuple = decltype(std::tuple_cat(std::declval<std::array<at::Tensor, n>>()));

#define FUSEDECODE_COUNT_ONE(...) +1
#define FUSEDECODE_COUNT_IF_ALWAYS(name, type, requested_by) FUSEDECODE_IF_ALWAYS(requested_by, +1)
constexpr size_t kLogitStatsOutputCount = 0 FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_COUNT_ONE);
// Those every call computes, which verify_tree returns too.
constexpr size_t kAlwaysStatsOutputCount = 0 FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_COUNT_IF_ALWAYS);

// The names of logit_stats' outputs in order (every one, or those every call computes: verify_tree's),
// for the schemas in csrc/ops.cpp.
inline std::vector<std::string> logit_stats_output_names(bool always_only) {
  std::vector<std::string> names;
#define FUSEDECODE_OUTPUT_NAME(name, type, requested_by) \
  if (!always_only || RequestedBy::requested_by == RequestedBy::always) names.push_back(#name);
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_OUTPUT_NAME)
#undef FUSEDECODE_OUTPUT_NAME
  return names;
}

// "(Tensor a, Tensor b, ...)": the return list of a schema whose outputs are all tensors.
inline std::string schema_returns(const std::vector<std::string>& names) {
  std::string returns = "(";
  for (size_t i = 0; i < names.size(); ++i) returns += (i ? ", Tensor " : "Tensor ") + names[i];
  return returns + ")";
}

// The outputs of fusedecode::logit_stats by name (FUSEDECODE_LOGIT_STATS_OUTPUTS). One entry per
// row ([outer * inner]); an output the call does not ask for is empty ([0]).
struct LogitStatsOutputs {
#define FUSEDECODE_TENSOR_MEMBER(name, type, requested_by) at::Tensor name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_TENSOR_MEMBER)
#undef FUSEDECODE_TENSOR_MEMBER

  // The schema's return value, in the output lists' order.
  using Returns = TensorTuple<kLogitStatsOutputCount>;
  Returns returns() const {
#define FUSEDECODE_NAME_COMMA(name, type, requested_by) name,
    return Returns{FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_NAME_COMMA)};
#undef FUSEDECODE_NAME_COMMA
  }

  // Raw pointers for the framework-free kernels (nullptr for an output not asked for).
  StatsOutputPointers pointers(bool with_token_ids, bool with_topk) {
    StatsOutputPointers out{};
#define FUSEDECODE_DATA_POINTER(name, type, requested_by) \
  out.name = is_requested(RequestedBy::requested_by, with_token_ids, with_topk) ? name.data_ptr<type>() : nullptr;
    FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_DATA_POINTER)
#undef FUSEDECODE_DATA_POINTER
    return out;
  }
};

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
  TORCH_CHECK(topk >= 0 && topk <= kMaxTopK, "topk must be in [0, ", kMaxTopK, "]");
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
inline LogitStatsOutputs allocate_logit_stats_outputs(const at::Tensor& logits, at::IntArrayRef shape,
                                                      bool with_token_ids, bool with_topk) {
  const int64_t not_asked_for[] = {0};
  auto shape_of = [&](RequestedBy requested_by) {
    return is_requested(requested_by, with_token_ids, with_topk) ? shape : at::IntArrayRef(not_asked_for);
  };
  LogitStatsOutputs outputs;
#define FUSEDECODE_ALLOCATE(name, type, requested_by)     \
  outputs.name = at::empty(shape_of(RequestedBy::requested_by), \
                           logits.options().dtype(c10::CppTypeToScalarType<type>::value));
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_ALLOCATE)
#undef FUSEDECODE_ALLOCATE
  return outputs;
}

}  // namespace fusedecode
