// Torch-side contract of fusedecode::verify_tree, shared by the CPU and CUDA bindings. Arguments
// arrive normalised by python/fusedecode/ops/verify_tree/checks.py; this re-checks the op's own contract.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "fusedecode/tree_walk.h"
#include "logit_stats_op.h"

namespace fusedecode {

// The walk's outputs of fusedecode::verify_tree, in the schema's order: num_accepted [B],
// accepted_nodes and output_tokens [B, D+1], all int64. They come first in OUTPUTS of
// python/fusedecode/ops/verify_tree/contract.py, followed by logit_stats' outputs every call computes.
#define FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS(X) \
  X(num_accepted)                              \
  X(accepted_nodes)                            \
  X(output_tokens)

// The names of verify_tree's outputs in order, for its schema in csrc/ops.cpp.
inline std::vector<std::string> verify_tree_output_names() {
#define FUSEDECODE_WALK_NAME(name) #name,
  std::vector<std::string> names{FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS(FUSEDECODE_WALK_NAME)};
#undef FUSEDECODE_WALK_NAME
  for (const std::string& name : logit_stats_output_names(/*always_only=*/true)) names.push_back(name);
  return names;
}

// The outputs of fusedecode::verify_tree by name.
struct VerifyTreeOutputs {
#define FUSEDECODE_WALK_MEMBER(name) at::Tensor name;
  FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS(FUSEDECODE_WALK_MEMBER)
#undef FUSEDECODE_WALK_MEMBER
  // [B, N], written by the statistics pass; verify_tree asks for neither token_logprob nor
  // topk_confidence (empty, not returned).
  LogitStatsOutputs stats;

  // The schema's return value, in the output lists' order.
  using Returns = TensorTuple<0 FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS(FUSEDECODE_COUNT_ONE) + kAlwaysStatsOutputCount>;
  Returns returns() const {
#define FUSEDECODE_WALK_COMMA(name) name,
#define FUSEDECODE_ALWAYS_STATS_COMMA(name, type, requested_by) FUSEDECODE_IF_ALWAYS(requested_by, stats.name, )
    return Returns{FUSEDECODE_VERIFY_TREE_WALK_OUTPUTS(FUSEDECODE_WALK_COMMA)
                       FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_ALWAYS_STATS_COMMA)};
#undef FUSEDECODE_ALWAYS_STATS_COMMA
#undef FUSEDECODE_WALK_COMMA
  }
};

inline void check_verify_tree_inputs(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents,
                                     double temperature, const c10::optional<at::Tensor>& draft_probs,
                                     const at::Tensor& seeds, int64_t depth) {
  TORCH_CHECK(logits.dim() == 3, "target_logits must be [B, N, V]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "target_logits must be float32, float16 or bfloat16");
  const int64_t batch = logits.size(0), nodes = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31), "target_logits: V must be in [1, 2^31)");
  TORCH_CHECK(vocab == 1 || logits.stride(2) == 1, "target_logits: the last dimension must be contiguous");
  auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 2 && t.size(0) == batch &&
                    t.size(1) == nodes && t.device() == logits.device(),
                name, " must be a contiguous int64 [B, N] tensor on the logits' device");
  };
  check_rows(tokens, "draft_tokens");
  check_rows(parents, "parents");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.is_contiguous() && seeds.dim() == 1 && seeds.size(0) == batch &&
                  seeds.device() == logits.device(),
              "seeds must be a contiguous int64 [B] tensor on the logits' device");
  TORCH_CHECK(temperature >= 0, "temperature must be >= 0");
  TORCH_CHECK(depth >= 0 && depth < std::max<int64_t>(nodes, 1), "depth must be in [0, N)");
  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.dim() == 3 && q.size(0) == batch && q.size(1) == nodes && q.size(2) == vocab &&
                    q.device() == logits.device() && (vocab == 1 || q.stride(2) == 1),
                "draft_probs must be [B, N, V] like target_logits, last dimension contiguous");
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "draft_probs must be float32, float16 or bfloat16");
  }
}

inline VerifyTreeOutputs allocate_verify_tree_outputs(const at::Tensor& logits, int64_t depth) {
  const int64_t batch = logits.size(0), nodes = logits.size(1);
  const auto i64 = logits.options().dtype(at::kLong);
  VerifyTreeOutputs outputs;
  outputs.num_accepted = at::zeros({batch}, i64);
  outputs.accepted_nodes = at::full({batch, depth + 1}, -1, i64);
  outputs.output_tokens = at::full({batch, depth + 1}, -1, i64);
  outputs.stats = allocate_logit_stats_outputs(logits, {batch, nodes}, false, false);
  return outputs;
}

inline int verify_mode(double temperature, const c10::optional<at::Tensor>& draft_probs) {
  return verify_mode_of(temperature, draft_probs.has_value());
}

}  // namespace fusedecode
