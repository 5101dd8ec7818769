// Driver of the CUDA verify_tree launcher (launch_verify_tree in
// csrc/include/fusedecode/verify_tree.cuh) on the emulator: the same host code as the torch binding
// (csrc/cuda/verify_tree_cuda.cu) runs, after what the binding does before it: outputs allocated by
// the caller, the workspace allocated here with undefined (poisoned) contents.
#include "fusedecode/verify_tree.cuh"
#include "fusedecode/stats_outputs.h"

#include "driver.h"

namespace {

// What emulator.py passes (ctypes.Structure VerifyTreeCall, same order).
struct VerifyTreeCall {
  int32_t dtype;
  int32_t prob_dtype;
  const void* logits;
  int64_t batch, nodes, vocab, stride_b, stride_n;
  const int64_t* tokens;
  const int64_t* parents;
  const int64_t* seeds;
  double temperature;
  const void* draft_probs;  // or nullptr
  int64_t q_stride_b, q_stride_n;
  // One pointer per output of FUSEDECODE_LOGIT_STATS_OUTPUTS that every call computes, in its order
  // (emulator.py reads the same list): the per-node statistics verify_tree returns.
#define FDEMU_ALWAYS_OUTPUT_POINTER(name, type, requested_by) FUSEDECODE_IF_ALWAYS(requested_by, type* name;)
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FDEMU_ALWAYS_OUTPUT_POINTER)
#undef FDEMU_ALWAYS_OUTPUT_POINTER
  int64_t* num_accepted;
  int64_t* accepted_nodes;
  int64_t* output_tokens;
  int64_t width;
};

void run_verify_tree(const VerifyTreeCall& call) {
  using namespace fusedecode;
  cuda::VerifyTreeArgs a{};
  a.logits = call.logits;
  a.batch = call.batch;
  a.nodes = call.nodes;
  a.vocab = call.vocab;
  a.stride_b = call.stride_b;
  a.stride_n = call.stride_n;
  a.tokens = call.tokens;
  a.parents = call.parents;
  a.seeds = call.seeds;
  a.temperature = call.temperature;
  a.draft_probs = call.draft_probs;
  a.q_stride_b = call.q_stride_b;
  a.q_stride_n = call.q_stride_n;
  a.stats = StatsOutputPointers{};  // the outputs verify_tree does not compute stay nullptr
#define FDEMU_PASS_ALWAYS_OUTPUT(name, type, requested_by) FUSEDECODE_IF_ALWAYS(requested_by, a.stats.name = call.name;)
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FDEMU_PASS_ALWAYS_OUTPUT)
#undef FDEMU_PASS_ALWAYS_OUTPUT
  a.num_accepted = call.num_accepted;
  a.accepted_nodes = call.accepted_nodes;
  a.output_tokens = call.output_tokens;
  a.width = call.width;
  if (call.batch == 0 || call.nodes == 0) return;  // as the binding
  if (!cuda::verify_tree_shape_supported(call.batch, call.nodes, call.vocab)) {
    fdemu::driver_error("verify_tree_shape_supported: the binding rejects this shape");
  }
  fdemu::PoisonedWorkspace workspace(cuda::verify_tree_workspace_bytes(call.batch, call.nodes, call.vocab));
  const bool multi_draft = verify_mode_of(call.temperature, call.draft_probs != nullptr) == kVerifyMultiDraft;
  fdemu::dispatch_dtype(call.dtype, "target_logits", [&](auto logits_tag) {
    using T = decltype(logits_tag);
    if (!multi_draft) {
      fdemu::check_launch(cuda::launch_verify_tree<T, float>(a, workspace.data, nullptr), "launch_verify_tree");
      return;
    }
    fdemu::dispatch_dtype(call.prob_dtype, "draft_probs", [&](auto prob_tag) {
      using P = decltype(prob_tag);
      fdemu::check_launch(cuda::launch_verify_tree<T, P>(a, workspace.data, nullptr), "launch_verify_tree");
    });
  });
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int fdemu_verify_tree(const VerifyTreeCall* call) {
  auto body = [&] { run_verify_tree(*call); };
  return fdemu::run_guarded(body);
}
