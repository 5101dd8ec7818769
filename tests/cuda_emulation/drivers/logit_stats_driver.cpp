// Driver of the CUDA logit_stats launcher (csrc/include/fusedecode/logit_stats.cuh) on the emulator:
// the launcher and kernel are the project's, translated by translate.py; this file only does what
// the torch binding (csrc/cuda/logit_stats_cuda.cu) does around them, with the number of CTAs per
// row chosen by the caller instead of from the GPU's size.
#include "fusedecode/logit_stats.cuh"
#include "fusedecode/stats_outputs.h"

#include "driver.h"

namespace {

// What emulator.py passes (ctypes.Structure LogitStatsCall, same order).
struct LogitStatsCall {
  int32_t dtype;
  int32_t topk;
  const void* logits;
  int64_t outer_size, inner_size, outer_stride, inner_stride, vocab;
  const float* temperatures;  // [rows] or nullptr
  double temperature;
  const int64_t* token_ids;  // [rows] or nullptr
  int64_t splits;
  int64_t vectors_per_split;
  // One pointer per output of FUSEDECODE_LOGIT_STATS_OUTPUTS, in its order (emulator.py reads the
  // same list); nullptr for an output the call does not ask for.
#define FDEMU_OUTPUT_POINTER(name, type, requested_by) type* name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FDEMU_OUTPUT_POINTER)
#undef FDEMU_OUTPUT_POINTER
};

void run_logit_stats(const LogitStatsCall& call) {
  using namespace fusedecode;
  cuda::LogitStatsParams p{};
  p.logits = call.logits;
  p.outer_size = call.outer_size;
  p.inner_size = call.inner_size;
  p.outer_stride = call.outer_stride;
  p.inner_stride = call.inner_stride;
  p.vocab = call.vocab;
  p.temperatures = call.temperatures;
  p.temperature = static_cast<float>(call.temperature);
  p.token_ids = call.token_ids;
  p.topk = call.topk;
#define FDEMU_PASS_OUTPUT(name, type, requested_by) p.out.name = call.name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FDEMU_PASS_OUTPUT)
#undef FDEMU_PASS_OUTPUT
  p.splits = static_cast<int>(call.splits);
  p.vectors_per_split = call.vectors_per_split;
  const int64_t rows = call.outer_size * call.inner_size;
  if (rows == 0) return;  // the binding returns before launching (a grid of 0 CTAs is a CUDA error)
  const int64_t slots = rows * call.splits;
  // The split-mode workspaces as the binding allocates them: states and top-k lists with undefined
  // contents, counters zero (the kernel leaves them at zero for the next launch).
  fdemu::PoisonedWorkspace states(call.splits > 1 ? slots * sizeof(StatsState) : 0);
  fdemu::PoisonedWorkspace topk_lists(call.splits > 1 && call.topk > 0 ? slots * cuda::kTopKCapacity * sizeof(float)
                                                                        : 0);
  fdemu::PoisonedWorkspace counters(call.splits > 1 ? rows * sizeof(unsigned int) : 0);
  if (call.splits > 1) {
    std::memset(counters.data, 0, rows * sizeof(unsigned int));
    p.partial_states = static_cast<StatsState*>(states.data);
    p.partial_topk = call.topk > 0 ? static_cast<float*>(topk_lists.data) : nullptr;
    p.row_counters = static_cast<unsigned int*>(counters.data);
  }
  fdemu::dispatch_dtype(call.dtype, "logits", [&](auto tag) {
    using T = decltype(tag);
    fdemu::check_launch(cuda::launch_logit_stats<T>(p, nullptr), "launch_logit_stats");
  });
  const unsigned int* after = static_cast<const unsigned int*>(counters.data);
  for (int64_t r = 0; call.splits > 1 && r < rows; ++r) {
    if (after[r] != 0) fdemu::driver_error("split mode left a row counter non-zero (the next launch would be wrong)");
  }
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int fdemu_logit_stats(const LogitStatsCall* call) {
  auto body = [&] { run_logit_stats(*call); };
  return fdemu::run_guarded(body);
}
