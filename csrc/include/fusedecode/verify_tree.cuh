// fusedecode: tree verification on CUDA. Framework-free: launch_verify_tree runs both passes on raw
// pointers; the torch binding (csrc/cuda/verify_tree_cuda.cu) only checks, allocates and calls it,
// and tests/cuda_emulation runs the same launcher on the CPU.
//
// Pass 1 is logit_stats_kernel over the B*N node rows in split mode with fixed kVerifySliceTokens-token
// slices (vocab_slices.h; cut as RowSlices in logit_stats.cuh), which writes every node's statistics and leaves one StatsState per slice.
// Pass 2, tree_walk_kernel, runs one CTA per tree: the shared walk logic (tree_walk.h) with
// CTA-collective row operations. Greedy needs only the argmaxes; a sample reads again the one slice
// that holds the drawn probability mass; SpecInfer's residual passes read the node's row and draft
// probabilities once per rejection.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedecode/logit_stats.cuh"
#include "fusedecode/tree_walk.h"

namespace fusedecode {
namespace cuda {

constexpr int kWalkThreads = 256;
constexpr int kWalkWarps = kWalkThreads / kWarpSize;
constexpr int kWalkTokensPerThread = static_cast<int>(kVerifySliceTokens / kWalkThreads);
constexpr int kMaxVerifySlices = kWalkThreads;  // V up to 256 * 4096 tokens

struct VerifyTreeParams {
  const void* logits;  // [B, N, V]
  int64_t stride_b, stride_n, vocab, nodes;
  const int64_t* tokens;   // [B, N]
  const int64_t* parents;  // [B, N]
  const int64_t* seeds;    // [B]
  float inv_t;
  int mode;
  const float* max_logprob;  // [B, N] from pass 1: -log sum exp(z - max z)
  const int64_t* argmax;     // [B, N] from pass 1
  const StatsState* slices;  // [B * N, splits] from pass 1
  int splits;
  const void* draft_probs;  // [B, N, V] or nullptr
  int64_t q_stride_b, q_stride_n;
  int64_t* num_accepted;    // [B]
  int64_t* accepted_nodes;  // [B, width]
  int64_t* output_tokens;   // [B, width]
  int64_t width;
};

template <typename T>
__device__ __forceinline__ float load_value(const T* p) {
  return VecLoad<T>::scalar(p);
}

struct WalkScratch {
  float f[kWalkWarps];
  long long i[kWalkWarps];
  long long broadcast;
  float broadcast_f;
};

__device__ __forceinline__ float cta_sum(float v, WalkScratch& s) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s.f[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWalkWarps; ++w) total += s.f[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float cta_max(float v, WalkScratch& s) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s.f[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWalkWarps; ++w) m = fmaxf(m, s.f[w]);
  __syncthreads();
  return m;
}

// Minimum (kMin) or maximum of a 64-bit value over the CTA.
template <bool kMin>
__device__ __forceinline__ long long cta_extreme(long long v, WalkScratch& s) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    const long long other = __shfl_xor_sync(kFullMask, v, o);
    v = kMin ? (other < v ? other : v) : (other > v ? other : v);
  }
  if ((threadIdx.x & (kWarpSize - 1)) == 0) s.i[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  long long r = s.i[0];
#pragma unroll
  for (int w = 1; w < kWalkWarps; ++w) r = kMin ? (s.i[w] < r ? s.i[w] : r) : (s.i[w] > r ? s.i[w] : r);
  __syncthreads();
  return r;
}

// Exclusive prefix sum over the threads of the CTA (in thread order), and the total.
__device__ __forceinline__ float cta_exclusive_scan(float v, WalkScratch& s, float* total) {
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
  float inclusive = v;
#pragma unroll
  for (int o = 1; o < kWarpSize; o *= 2) {
    const float up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == kWarpSize - 1) s.f[warp] = inclusive;
  __syncthreads();
  float offset = 0.f, sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWalkWarps; ++w) {
    if (w < warp) offset += s.f[w];
    sum += s.f[w];
  }
  __syncthreads();
  *total = sum;
  return offset + inclusive - v;
}

constexpr long long kNone = 0x7fffffffffffffffLL;

template <typename T, typename P>
struct CudaTreeRow {
  const VerifyTreeParams& p;
  WalkScratch& scratch;
  int64_t b;
  const T* logits;  // node 0 of this batch row
  const P* q;       // node 0 of this batch row, or nullptr
  const int64_t* parents;
  const int64_t* tokens;

  __device__ float x(int64_t node, int64_t i) const { return load_value(logits + node * p.stride_n + i); }
  __device__ bool valid(int64_t node) const { return p.argmax[b * p.nodes + node] >= 0; }
  __device__ int64_t vocab_size() const { return p.vocab; }
  __device__ int64_t argmax(int64_t node) const { return p.argmax[b * p.nodes + node]; }
  __device__ int64_t token(int64_t node) const { return tokens[node]; }
  // p_node(t) relative to the row max (never z_t - logsumexp, a difference of two large numbers);
  // the row's max and log-probability are read once per pass over the vocabulary.
  struct NodeProb {
    float max_x;
    float max_logprob;
  };
  __device__ NodeProb node_prob(int64_t node) const {
    return {x(node, argmax(node)), p.max_logprob[b * p.nodes + node]};
  }
  __device__ float prob_of(const NodeProb& np, float value) const {
    return __expf(scaled_gap(value, np.max_x, p.inv_t) + np.max_logprob);
  }
  __device__ float prob(int64_t node, int64_t t) const { return prob_of(node_prob(node), x(node, t)); }
  __device__ float draft_prob(int64_t node, int64_t t) const { return load_value(q + node * p.q_stride_n + t); }

  __device__ int64_t child_with_token(int64_t node, int64_t wanted) const {
    long long found = kNone;
    for (int64_t c = node + 1 + threadIdx.x; c < p.nodes; c += kWalkThreads) {
      if (parents[c] == node && tokens[c] == wanted && c < found) found = c;
    }
    const long long best = cta_extreme<true>(found, scratch);
    return best == kNone ? -1 : best;
  }
  __device__ int64_t next_child(int64_t node, int64_t after) const {
    long long found = kNone;
    for (int64_t c = after + 1 + threadIdx.x; c < p.nodes; c += kWalkThreads) {
      if (parents[c] == node && c < found) found = c;
    }
    const long long best = cta_extreme<true>(found, scratch);
    return best == kNone ? -1 : best;
  }

  __device__ float excess(const NodeProb& np, int64_t node, int64_t i, float c) const {
    const float e = prob_of(np, x(node, i)) - c * draft_prob(node, i);
    return e > 0.f ? e : 0.f;
  }
  __device__ float residual_mass(int64_t node, float c) const {
    const NodeProb np = node_prob(node);
    float local = 0.f;
    for (int64_t i = threadIdx.x; i < p.vocab; i += kWalkThreads) local += excess(np, node, i, c);
    return cta_sum(local, scratch);
  }

  // Inverse CDF over tokens [lo, hi) in order, in tiles of kVerifySliceTokens (thread t owns a
  // contiguous run of kWalkTokensPerThread tokens per tile). `weight(i)` >= 0. Returns the token
  // where the running mass first reaches `target` (>= 0 and with positive weight), or -1 and the
  // mass seen in *seen.
  template <class Weight>
  __device__ int64_t scan_tokens(int64_t lo, int64_t hi, float target, Weight weight, float* seen,
                                 long long* last_positive) const {
    float running = 0.f;
    for (int64_t tile = lo; tile < hi; tile += kVerifySliceTokens) {
      const int64_t begin = tile + static_cast<int64_t>(threadIdx.x) * kWalkTokensPerThread;
      float local = 0.f;
      long long last = -1;
      for (int k = 0; k < kWalkTokensPerThread; ++k) {
        const int64_t i = begin + k;
        if (i < hi) {
          const float w = weight(i);
          if (w > 0.f) {
            local += w;
            last = i;
          }
        }
      }
      float tile_total;
      const float before = running + cta_exclusive_scan(local, scratch, &tile_total);
      const bool crosses = local > 0.f && before + local >= target;
      const long long first_thread = cta_extreme<true>(crosses ? static_cast<long long>(threadIdx.x) : kNone, scratch);
      const long long tile_last = cta_extreme<false>(last, scratch);
      if (tile_last > *last_positive) *last_positive = tile_last;
      if (first_thread != kNone) {
        if (threadIdx.x == first_thread) {
          float acc = before;
          long long hit = last;
          for (int k = 0; k < kWalkTokensPerThread; ++k) {
            const int64_t i = begin + k;
            if (i >= hi) break;
            const float w = weight(i);
            if (w > 0.f) {
              acc += w;
              if (acc >= target) {
                hit = i;
                break;
              }
            }
          }
          scratch.broadcast = hit;
        }
        __syncthreads();
        const long long hit = scratch.broadcast;
        __syncthreads();
        return hit;
      }
      running += tile_total;
    }
    *seen = running;
    return -1;
  }

  __device__ int64_t sample(int64_t node, float c, float mass, float u) const {
    long long last_positive = -1;
    float seen = 0.f;
    if (c != 0.f) {
      const NodeProb np = node_prob(node);
      const int64_t hit = scan_tokens(
          0, p.vocab, u * mass, [&](int64_t i) { return excess(np, node, i, c); }, &seen, &last_positive);
      return hit >= 0 ? hit : (last_positive >= 0 ? last_positive : argmax(node));
    }
    // Which slice holds the drawn mass (one thread per slice), then the tokens of that slice.
    const StatsState* own = p.slices + (b * p.nodes + node) * p.splits;
    const bool mine = threadIdx.x < p.splits && own[threadIdx.x].count > 0;
    const float max_x = cta_max(mine ? own[threadIdx.x].max_x : -INFINITY, scratch);
    const float slice_mass =
        mine ? own[threadIdx.x].sum_exp * __expf(merge_shift(own[threadIdx.x].max_x, max_x, p.inv_t)) : 0.f;
    float total;
    const float before = cta_exclusive_scan(slice_mass, scratch, &total);
    const float target = u * total;
    const bool crosses = slice_mass > 0.f && before + slice_mass >= target;
    long long chosen = cta_extreme<true>(crosses ? static_cast<long long>(threadIdx.x) : kNone, scratch);
    if (chosen == kNone) chosen = cta_extreme<false>(slice_mass > 0.f ? static_cast<long long>(threadIdx.x) : -1, scratch);
    if (chosen < 0) return argmax(node);
    if (threadIdx.x == chosen) scratch.broadcast_f = target - before;
    __syncthreads();
    const float remaining = scratch.broadcast_f;
    __syncthreads();
    // Token range of slice `chosen` as pass 1 cut it.
    const T* row = logits + node * p.stride_n;
    const RowSlices<T> cut(row, p.vocab, p.splits, kVerifySliceTokens / RowSlices<T>::kVec);
    const int64_t lo = cut.token_begin(chosen);
    const int64_t hi = cut.token_end(chosen);
    const float inv_t = p.inv_t;
    const int64_t hit = scan_tokens(
        lo, hi, remaining,
        [&](int64_t i) {
          const float value = load_value(row + i);
          // (value - max_x) * inv_t first: -inf (weight 0) where the gap overflows, never 0 * inf.
          return value == -INFINITY ? 0.f : exp2f(((value - max_x) * inv_t) * kLog2e);
        },
        &seen, &last_positive);
    return hit >= 0 ? hit : (last_positive >= 0 ? last_positive : argmax(node));
  }
};

template <typename T, typename P>
__global__ void __launch_bounds__(kWalkThreads) tree_walk_kernel(const VerifyTreeParams p) {
  __shared__ WalkScratch scratch;
  const int64_t b = blockIdx.x;
  CudaTreeRow<T, P> row{p,
                        scratch,
                        b,
                        static_cast<const T*>(p.logits) + b * p.stride_b,
                        p.draft_probs ? static_cast<const P*>(p.draft_probs) + b * p.q_stride_b : nullptr,
                        p.parents + b * p.nodes,
                        p.tokens + b * p.nodes};
  walk_tree(row, p.mode, static_cast<uint64_t>(p.seeds[b]), static_cast<uint64_t>(b), threadIdx.x == 0, p.width,
            p.accepted_nodes + b * p.width, p.output_tokens + b * p.width, p.num_accepted + b);
}

template <typename T, typename P>
cudaError_t launch_tree_walk(const VerifyTreeParams& p, int64_t batch, cudaStream_t stream) {
  tree_walk_kernel<T, P><<<static_cast<unsigned>(batch), kWalkThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Everything verify_tree reads and writes, as the binding fills it from its tensors.
struct VerifyTreeArgs {
  const void* logits;  // [B, N, V], last dimension contiguous
  int64_t batch, nodes, vocab;
  int64_t stride_b, stride_n;  // elements
  const int64_t* tokens;       // [B, N] contiguous
  const int64_t* parents;      // [B, N] contiguous
  const int64_t* seeds;        // [B]
  double temperature;          // 0: greedy (statistics at temperature 1)
  const void* draft_probs;     // [B, N, V], last dimension contiguous, or nullptr; unused when greedy
  int64_t q_stride_b, q_stride_n;
  StatsOutputPointers stats;  // [B, N] each; token_logprob and topk_confidence nullptr
  // The walk writes num_accepted and the entries it reaches; the rest must hold their fill already
  // (0 and -1, as fusedecode's output allocation gives them).
  int64_t* num_accepted;    // [B]
  int64_t* accepted_nodes;  // [B, width]
  int64_t* output_tokens;   // [B, width]
  int64_t width;            // D + 1
};

// Slices per node row in the statistics pass.
inline int64_t verify_tree_splits(int64_t vocab) { return VocabSlices{vocab, kVerifySliceTokens}.count(); }

// Whether launch_verify_tree can run this shape: at most kMaxVerifySlices slices per row (V up to
// kMaxVerifySlices * kVerifySliceTokens) and fewer than 2^31 (row, slice) CTAs.
inline bool verify_tree_shape_supported(int64_t batch, int64_t nodes, int64_t vocab) {
  const int64_t splits = verify_tree_splits(vocab);
  return splits <= kMaxVerifySlices && batch * nodes * splits < (int64_t{1} << 31);
}

// The device workspace launch_verify_tree needs: one StatsState per (node row, slice), which the
// sampling pass reads back, then one completion counter per node row.
inline size_t verify_tree_workspace_bytes(int64_t batch, int64_t nodes, int64_t vocab) {
  const int64_t rows = batch * nodes;
  return static_cast<size_t>(rows * verify_tree_splits(vocab)) * sizeof(StatsState) +
         static_cast<size_t>(rows) * sizeof(unsigned int);
}

// Pass 1: logit_stats over the B*N node rows in kVerifySliceTokens-token slices, keeping the
// slices' states in `slices`.
template <typename T>
LogitStatsParams statistics_pass_params(const VerifyTreeArgs& a, StatsState* slices, unsigned int* counters) {
  LogitStatsParams s{};
  s.logits = a.logits;
  s.outer_size = a.batch;
  s.inner_size = a.nodes;
  s.outer_stride = a.stride_b;
  s.inner_stride = a.stride_n;
  s.vocab = a.vocab;
  s.temperature = verify_statistics_temperature(a.temperature);
  s.out = a.stats;
  s.splits = static_cast<int>(verify_tree_splits(a.vocab));
  s.vectors_per_split = kVerifySliceTokens / VecLoad<T>::kVec;
  s.partial_states = slices;
  s.row_counters = counters;
  return s;
}

// Pass 2: the tree walk, reading pass 1's statistics and slices.
inline VerifyTreeParams walk_pass_params(const VerifyTreeArgs& a, const StatsState* slices) {
  VerifyTreeParams w{};
  w.logits = a.logits;
  w.stride_b = a.stride_b;
  w.stride_n = a.stride_n;
  w.vocab = a.vocab;
  w.nodes = a.nodes;
  w.tokens = a.tokens;
  w.parents = a.parents;
  w.seeds = a.seeds;
  w.inv_t = 1.f / verify_statistics_temperature(a.temperature);
  w.mode = verify_mode_of(a.temperature, a.draft_probs != nullptr);
  w.max_logprob = a.stats.max_logprob;
  w.argmax = a.stats.argmax;
  w.slices = slices;
  w.splits = static_cast<int>(verify_tree_splits(a.vocab));
  if (w.mode == kVerifyMultiDraft) {
    w.draft_probs = a.draft_probs;
    w.q_stride_b = a.q_stride_b;
    w.q_stride_n = a.q_stride_n;
  }
  w.num_accepted = a.num_accepted;
  w.accepted_nodes = a.accepted_nodes;
  w.output_tokens = a.output_tokens;
  w.width = a.width;
  return w;
}

// verify_tree on `stream`: T is the logits' type, P the draft probabilities' (any type when there
// are none). `workspace`: verify_tree_workspace_bytes, 16-byte aligned, contents irrelevant.
template <typename T, typename P>
cudaError_t launch_verify_tree(const VerifyTreeArgs& a, void* workspace, cudaStream_t stream) {
  if (a.batch == 0 || a.nodes == 0) return cudaSuccess;
  if (!verify_tree_shape_supported(a.batch, a.nodes, a.vocab)) return cudaErrorInvalidValue;
  const int64_t rows = a.batch * a.nodes;
  StatsState* slices = static_cast<StatsState*>(workspace);
  unsigned int* counters = reinterpret_cast<unsigned int*>(slices + rows * verify_tree_splits(a.vocab));
  cudaError_t error = cudaMemsetAsync(counters, 0, static_cast<size_t>(rows) * sizeof(unsigned int), stream);
  if (error != cudaSuccess) return error;
  error = launch_logit_stats<T>(statistics_pass_params<T>(a, slices, counters), stream);
  if (error != cudaSuccess) return error;
  return launch_tree_walk<T, P>(walk_pass_params(a, slices), a.batch, stream);
}

}  // namespace cuda
}  // namespace fusedecode
