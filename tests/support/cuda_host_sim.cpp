// The CUDA logit_stats kernel's accumulation, run on the host (tests/test_cuda_host_sim.py).
//
// Replays what one CTA does with a float32 row in one-CTA-per-row mode: 256 threads, 16-byte
// vectors (4 floats) dealt out in batches of 4 per thread, a fold into a StatsState every 32 vectors,
// the scalar tail, using the kernel's own ThreadSums (thread_sums.h) and stats_state.h. The block
// combine (warp shuffles on the GPU) is replaced by pairwise merges in thread order, which is the
// same math. Rows are assumed 16-byte aligned (no scalar head).
//
// Input (binary): int64 rows, int64 vocab, then rows float32 temperatures, then rows * vocab floats.
// Output (binary): per row, the outputs every call computes (the FUSEDECODE_IF_ALWAYS entries of
// FUSEDECODE_LOGIT_STATS_OUTPUTS), each in its own type, in the list's order, unpadded.
#include "fusedecode/stats_outputs.h"
#include "fusedecode/stats_state.h"
#include "fusedecode/thread_sums.h"

#include <cstdio>
#include <vector>

using fusedecode::StatsState;
using fusedecode::cuda::ThreadSums;

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kUnroll = 4;
constexpr int kFoldBatches = 32 / kUnroll;

StatsState reduce_row(const float* row, int64_t vocab, float t) {
  const float inv_t = 1.f / t;
  const float scale2 = inv_t * fusedecode::kLog2e;
  const fusedecode::GapLimits limits = fusedecode::gap_limits(scale2, fusedecode::cuda::kThreadWindow);
  const int64_t num_vectors = vocab / kVec;
  const int64_t tail_begin = num_vectors * kVec;
  StatsState block = fusedecode::empty_state();
  for (int tid = 0; tid < kThreads; ++tid) {
    ThreadSums sums;
    sums.reset();
    StatsState state = fusedecode::empty_state();
    int batches = 0;
    for (int64_t base = 0; base < num_vectors; base += static_cast<int64_t>(kThreads) * kUnroll) {
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t index = base + u * kThreads + tid;
        if (index >= num_vectors) continue;
        float v[kVec];
        for (int j = 0; j < kVec; ++j) v[j] = row[index * kVec + j];
        sums.add<kVec>(v, static_cast<int32_t>(index * kVec), scale2, inv_t, limits);
      }
      if (++batches == kFoldBatches) {
        state = fusedecode::merge_states(state, sums.fold(inv_t), inv_t);
        sums.reset();
        batches = 0;
      }
    }
    const int64_t index = tail_begin + tid;
    if (index < vocab) {
      float v[1] = {row[index]};
      sums.add<1>(v, static_cast<int32_t>(index), scale2, inv_t, limits);
    }
    block = fusedecode::merge_states(block, fusedecode::merge_states(state, sums.fold(inv_t), inv_t), inv_t);
  }
  return block;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s input output\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 3;
  int64_t rows = 0, vocab = 0;
  if (std::fread(&rows, sizeof(rows), 1, in) != 1 || std::fread(&vocab, sizeof(vocab), 1, in) != 1) return 4;
  std::vector<float> temperatures(rows), logits(rows * vocab);
  if (std::fread(temperatures.data(), sizeof(float), rows, in) != static_cast<size_t>(rows)) return 5;
  if (std::fread(logits.data(), sizeof(float), rows * vocab, in) != static_cast<size_t>(rows * vocab)) return 6;
  std::fclose(in);
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 7;
  for (int64_t r = 0; r < rows; ++r) {
    const float t = temperatures[r];
    const StatsState state = reduce_row(logits.data() + r * vocab, vocab, t);
    const fusedecode::StatsFields f = fusedecode::finalize_state(state, 1.f / t, fusedecode::temperature_is_valid(t));
#define WRITE_ALWAYS_OUTPUT(name, type, requested_by) \
  FUSEDECODE_IF_ALWAYS(requested_by, std::fwrite(&f.name, sizeof(type), 1, out);)
    FUSEDECODE_LOGIT_STATS_OUTPUTS(WRITE_ALWAYS_OUTPUT)
#undef WRITE_ALWAYS_OUTPUT
  }
  std::fclose(out);
  return 0;
}
