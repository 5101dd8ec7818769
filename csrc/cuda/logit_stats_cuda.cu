// Torch binding of the CUDA logit_stats kernel: checks, dtype dispatch, workspace, current stream.
#include "fusedecode/logit_stats.cuh"
#include "../dispatch.h"
#include "../logit_stats_op.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <map>
#include <mutex>
#include <utility>

namespace fusedecode {
namespace {

// Per-row completion counters of split mode. The kernel leaves them at zero, so one zeroed buffer
// per (device, stream) serves every launch on that stream without a memset per call. Split mode only
// runs with fewer rows than `capacity`, so the buffer is never reallocated: a captured CUDA graph
// keeps a valid pointer for as long as the process lives.
unsigned int* row_counters(const at::Tensor& like, int64_t rows, int64_t capacity, cudaStream_t stream) {
  TORCH_CHECK(rows <= capacity, "fusedecode: split mode needs fewer rows than its counter buffer");
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> cache;
  const auto key = std::make_pair(static_cast<int>(like.get_device()), stream);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, at::zeros({capacity}, like.options().dtype(at::kInt))).first;
  return reinterpret_cast<unsigned int*>(it->second.data_ptr<int>());
}

LogitStatsOutputs::Returns logit_stats_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& temperature,
                                            double temperature_scalar, const c10::optional<at::Tensor>& token_ids,
                                            int64_t topk) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  const RowLayout layout = check_logit_stats_inputs(logits, temperature, token_ids, topk);
  const c10::cuda::CUDAGuard guard(logits.device());
  LogitStatsOutputs outputs =
      allocate_logit_stats_outputs(logits, {logits.size(0) * logits.size(1)}, token_ids.has_value(), topk > 0);
  const int64_t rows = layout.num_rows();
  if (rows == 0) return outputs.returns();

  cuda::LogitStatsParams p{};
  p.logits = logits.const_data_ptr();
  p.outer_size = layout.outer_size;
  p.inner_size = layout.inner_size;
  p.outer_stride = layout.outer_stride;
  p.inner_stride = layout.inner_stride;
  p.vocab = layout.vocab;
  p.temperatures = temperature.has_value() ? temperature->const_data_ptr<float>() : nullptr;
  p.temperature = static_cast<float>(temperature_scalar);
  p.token_ids = token_ids.has_value() ? token_ids->const_data_ptr<int64_t>() : nullptr;
  p.topk = static_cast<int>(topk);
  p.out = outputs.pointers(token_ids.has_value(), topk > 0);

  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.splits = cuda::choose_splits(rows, layout.vocab, static_cast<int>(logits.element_size()), sm_count);
  TORCH_CHECK(rows * p.splits < (int64_t{1} << 31), "logits: too many rows for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor state_workspace, topk_workspace;
  if (p.splits > 1) {
    const int64_t slots = rows * p.splits;
    static_assert(sizeof(StatsState) % sizeof(float) == 0, "StatsState must be a whole number of floats");
    state_workspace = at::empty({slots * static_cast<int64_t>(sizeof(StatsState) / sizeof(float))},
                                logits.options().dtype(at::kFloat));
    p.partial_states = reinterpret_cast<StatsState*>(state_workspace.data_ptr<float>());
    if (topk > 0) {
      topk_workspace = at::empty({slots * cuda::kTopKCapacity}, logits.options().dtype(at::kFloat));
      p.partial_topk = topk_workspace.data_ptr<float>();
    }
    p.row_counters = row_counters(logits, rows, cuda::kSplitRowCapacityPerSM * sm_count, stream);
  }

  dispatch_float_dtype<__half, __nv_bfloat16>(logits.scalar_type(), "logits", [&](auto logits_tag) {
    using T = decltype(logits_tag);
    C10_CUDA_CHECK(cuda::launch_logit_stats<T>(p, stream));
  });
  return outputs.returns();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedecode, CUDA, m) { m.impl("logit_stats", &logit_stats_cuda); }

}  // namespace fusedecode
