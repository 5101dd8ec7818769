// fusedecode: one-pass logit statistics on CUDA. Framework-free: raw pointers in, raw pointers out;
// the torch binding (csrc/cuda/logit_stats_cuda.cu) only checks inputs, picks the dtype and stream.
//
// One CTA reduces one row, or one slice of a row when rows are too few to fill the GPU ("split"
// mode): then each CTA writes a StatsState to a workspace, and the last CTA of the row to finish
// (an atomic counter per row, reset by that CTA) merges the slices and writes the outputs, so the op
// stays one launch. Each thread reads 16-byte vectors, keeps exp-weighted sums relative to its own
// running max (rescaled only when the max grows; far entries weigh exactly 0), folds them into a
// StatsState every kFoldVectors vectors, and the block merges thread states with warp shuffles. With topk, every warp keeps the
// k largest raw logits it has seen in registers (two per lane, sorted), and only values above the
// warp's current k-th largest are inserted, so after a short warm-up the top-k costs one compare
// per element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedecode/stats_state.h"
#include "fusedecode/thread_sums.h"

namespace fusedecode {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kFoldVectors = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Entries of a warp's top-k list (WarpTopK: two per lane): every topk the op accepts fits.
constexpr int kTopKCapacity = 2 * kWarpSize;
static_assert(kMaxTopK <= kTopKCapacity, "WarpTopK holds at most two candidates per lane");

struct LogitStatsParams {
  const void* logits;
  int64_t outer_size;
  int64_t inner_size;
  int64_t outer_stride;  // elements
  int64_t inner_stride;  // elements
  int64_t vocab;
  const float* temperatures;  // one per row, or nullptr to use `temperature`
  float temperature;
  const int64_t* token_ids;  // one per row, or nullptr
  int topk;                  // 0: off
  StatsOutputPointers out;   // token_logprob when token_ids, topk_confidence when topk > 0
  int splits;              // CTAs per row
  int64_t vectors_per_split;   // 16-byte vectors per slice; 0: split the row evenly
  // [rows * splits]: every slice's state. Needed when splits > 1; with one slice per row it is
  // written only if given (verify_tree samples from it whatever the number of slices).
  StatsState* partial_states;
  float* partial_topk;         // [rows * splits * kTopKCapacity] when splits > 1 and topk > 0
  unsigned int* row_counters;  // [rows], all zero on entry and on exit, when splits > 1
};

template <typename T>
struct VecLoad;

template <>
struct VecLoad<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static void to_float(const uint4& raw, float (&out)[kVec]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static float scalar(const float* p) { return *p; }
};

template <>
struct VecLoad<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float (&out)[kVec]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static float scalar(const __nv_bfloat16* p) { return __bfloat162float(*p); }
};

template <>
struct VecLoad<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float (&out)[kVec]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      memcpy(&h2, &words[i], sizeof(h2));
      const float2 f2 = __half22float2(h2);
      out[2 * i] = f2.x;
      out[2 * i + 1] = f2.y;
    }
  }
  __device__ __forceinline__ static float scalar(const __half* p) { return __half2float(*p); }
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// How the kernel cuts a row into `splits` slices, one CTA each: a scalar head up to the first
// 16-byte boundary, aligned 16-byte vectors, a scalar tail. Slice s reads vectors
// [s * per_split, (s + 1) * per_split) (clamped); slice 0 also reads the head and the last slice
// the tail. verify_tree's sampling pass (verify_tree.cuh) re-reads one slice through token_begin /
// token_end: this is the one statement of that layout on CUDA.
template <typename T>
struct RowSlices {
  static constexpr int kVec = VecLoad<T>::kVec;
  int64_t vocab;
  int splits;
  int64_t head;         // scalar tokens before the first aligned vector
  int64_t num_vectors;  // whole aligned vectors after the head
  int64_t per_split;    // vectors per slice

  // vectors_per_split: fixed vectors per slice (verify_tree: kVerifySliceTokens / kVec), or 0 to
  // split the row evenly.
  __device__ RowSlices(const T* row, int64_t vocab_, int splits_, int64_t vectors_per_split)
      : vocab(vocab_), splits(splits_) {
    const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T));
    head = misaligned ? min64(kVec - misaligned, vocab) : 0;
    num_vectors = (vocab - head) / kVec;
    per_split = vectors_per_split > 0 ? vectors_per_split : (num_vectors + splits - 1) / splits;
  }
  __device__ int64_t tail_begin() const { return head + num_vectors * kVec; }
  __device__ int64_t vec_begin(int64_t slice) const { return min64(num_vectors, slice * per_split); }
  __device__ int64_t vec_end(int64_t slice) const { return min64(num_vectors, vec_begin(slice) + per_split); }
  // Tokens [token_begin, token_end) of slice `slice`, head and tail included.
  __device__ int64_t token_begin(int64_t slice) const { return slice == 0 ? 0 : head + vec_begin(slice) * kVec; }
  __device__ int64_t token_end(int64_t slice) const {
    return slice == splits - 1 ? vocab : head + vec_end(slice) * kVec;
  }
};

// The k largest values a warp has been offered, sorted descending: lane l holds entries l and 32 + l.
struct WarpTopK {
  float lo, hi;
  float threshold;  // the k-th largest so far; only larger values can enter

  __device__ __forceinline__ void reset() { lo = hi = threshold = -INFINITY; }

  // Warp-uniform `v` with v > threshold.
  __device__ __forceinline__ void insert(float v, int k) {
    const int lane = threadIdx.x & (kWarpSize - 1);
    const int pos = __popc(__ballot_sync(kFullMask, lo >= v)) + __popc(__ballot_sync(kFullMask, hi >= v));
    const float lo_prev = __shfl_up_sync(kFullMask, lo, 1);
    const float hi_prev = __shfl_up_sync(kFullMask, hi, 1);
    const float lo_last = __shfl_sync(kFullMask, lo, kWarpSize - 1);
    const float new_lo = lane < pos ? lo : (lane == pos ? v : lo_prev);
    const int hi_index = kWarpSize + lane;
    const float new_hi = hi_index < pos ? hi : (hi_index == pos ? v : (lane == 0 ? lo_last : hi_prev));
    lo = new_lo;
    hi = new_hi;
    threshold = k <= kWarpSize ? __shfl_sync(kFullMask, lo, k - 1) : __shfl_sync(kFullMask, hi, k - 1 - kWarpSize);
  }

  // Warp-collective: every lane offers its N values (or none when !valid).
  template <int N>
  __device__ __forceinline__ void offer(const float (&v)[N], bool valid, int k) {
    bool wants = false;
#pragma unroll
    for (int j = 0; j < N; ++j) wants |= valid && v[j] > threshold;
    unsigned pending = __ballot_sync(kFullMask, wants);
    while (pending) {
      const int src = __ffs(pending) - 1;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float candidate = __shfl_sync(kFullMask, v[j], src);
        if (candidate > threshold) insert(candidate, k);
      }
      pending &= pending - 1;
    }
  }

  // Sum of entry - max_x over the first `n` entries (n <= k), in double (gaps of up to 2 * FLT_MAX;
  // once per row), valid in every lane.
  __device__ __forceinline__ double gap_sum_first(int n, float max_x) const {
    const int lane = threadIdx.x & (kWarpSize - 1);
    const double max_d = static_cast<double>(max_x);
    double part = (lane < n ? static_cast<double>(lo) - max_d : 0.0) +
                  (kWarpSize + lane < n ? static_cast<double>(hi) - max_d : 0.0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) part += __shfl_xor_sync(kFullMask, part, offset);
    return part;
  }
};

// Combine one StatsState per participating thread into the state of their union, returned in every
// thread. Instead of log2(n) pairwise merges (each with an exp and divisions on the critical path),
// three cheap reductions: the max (and argmax), then the exp-weighted sums relative to that max
// (shifts as in merge_states: far states weigh exactly 0) and the count-weighted gap means, then the
// spread of the means around the combined mean (Chan's formula, two-pass, so no cancellation).
// kBlock: all threads of the block (uses shared memory and three barriers); else one warp.
struct CombineScratch {
  float max_x[kThreads / kWarpSize];
  int32_t argmax[kThreads / kWarpSize];
  float sums[4][kThreads / kWarpSize];
  int32_t count[kThreads / kWarpSize];
};

template <bool kBlock>
__device__ __forceinline__ float combine_sum(float v, CombineScratch* scratch, int slot) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  if constexpr (kBlock) {
    const int warp = threadIdx.x / kWarpSize;
    if ((threadIdx.x & (kWarpSize - 1)) == 0) scratch->sums[slot][warp] = v;
    __syncthreads();
    v = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / kWarpSize; ++w) v += scratch->sums[slot][w];
  }
  return v;
}

template <bool kBlock>
__device__ StatsState combine_states(const StatsState& s, CombineScratch* scratch, float inv_t) {
  // 1. max and argmax (ties to the lowest index)
  float max_x = s.max_x;
  int32_t argmax = s.argmax;
  int32_t count = s.count;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_max = __shfl_xor_sync(kFullMask, max_x, offset);
    const int32_t other_arg = __shfl_xor_sync(kFullMask, argmax, offset);
    const bool take = other_max > max_x || (other_max == max_x && other_arg < argmax);
    max_x = take ? other_max : max_x;
    argmax = take ? other_arg : argmax;
    count += __shfl_xor_sync(kFullMask, count, offset);
  }
  if constexpr (kBlock) {
    const int warp = threadIdx.x / kWarpSize;
    if ((threadIdx.x & (kWarpSize - 1)) == 0) {
      scratch->max_x[warp] = max_x;
      scratch->argmax[warp] = argmax;
      scratch->count[warp] = count;
    }
    __syncthreads();
    max_x = scratch->max_x[0];
    argmax = scratch->argmax[0];
    count = scratch->count[0];
#pragma unroll
    for (int w = 1; w < kThreads / kWarpSize; ++w) {
      const bool take = scratch->max_x[w] > max_x || (scratch->max_x[w] == max_x && scratch->argmax[w] < argmax);
      max_x = take ? scratch->max_x[w] : max_x;
      argmax = take ? scratch->argmax[w] : argmax;
      count += scratch->count[w];
    }
  }
  StatsState out = empty_state();
  if (count == 0) return out;
  // 2. weights and first moments relative to the common maximum
  const bool used = s.count > 0;
  const float shift = used ? merge_shift(s.max_x, max_x, inv_t) : 0.f;
  const float weight = used ? s.sum_exp * __expf(shift) : 0.f;
  const float mean = s.wmean + shift;
  const float weight_sum = combine_sum<kBlock>(weight, scratch, 0);
  const float mean_sum = combine_sum<kBlock>(used ? weight * mean : 0.f, scratch, 1);
  const float share = static_cast<float>(s.count) / static_cast<float>(count);
  const float gap_mean =
      combine_sum<kBlock>(used ? share * (s.half_gap_mean + half_gap(s.max_x, max_x)) : 0.f, scratch, 2);
  out.ref = max_x * inv_t;
  out.sum_exp = weight_sum;
  out.wmean = mean_sum / weight_sum;
  out.half_gap_mean = gap_mean;
  // 3. spread of the means around the combined mean
  const float centred = mean - out.wmean;
  out.wvar = combine_sum<kBlock>(used ? weight * (s.wvar + centred * centred) : 0.f, scratch, 3) / weight_sum;
  out.count = count;
  out.max_x = max_x;
  out.argmax = argmax;
  return out;
}

// The kernel's steps, in the order it runs them (each __forceinline__: the kernel compiles to the
// same machine code as one body; benchmarks/NOTES.md has the SASS counts).

// Step 1, every thread: its share of the CTA's slice of the row (scalar head in slice 0, 16-byte
// vectors, scalar tail in the last slice), as one StatsState; with kTopK its values also go
// through the warp's top-k list `top`. Loads of the next batch are issued before the current batch
// is reduced (register double buffering), so every thread keeps kUnroll 16-byte loads in flight
// while it computes; the exp-weighted sums are folded into the state every kFoldVectors vectors.
template <typename T, bool kTopK>
__device__ __forceinline__ StatsState reduce_thread_share(const LogitStatsParams& p, const RowSlices<T>& cut,
                                                          const T* row_ptr, int split, float inv_t, WarpTopK& top) {
  using Load = VecLoad<T>;
  constexpr int kVec = Load::kVec;
  constexpr int64_t kStride = static_cast<int64_t>(kThreads) * kUnroll;
  const int tid = threadIdx.x;
  const int k = p.topk;
  const float scale2 = inv_t * kLog2e;
  const GapLimits limits = gap_limits(scale2, kThreadWindow);
  const int64_t head = cut.head;
  const int64_t tail_begin = cut.tail_begin();
  const int64_t vec_begin = cut.vec_begin(split);
  const int64_t vec_end = cut.vec_end(split);
  const uint4* vectors = reinterpret_cast<const uint4*>(row_ptr + head);

  ThreadSums sums;
  sums.reset();
  StatsState state = empty_state();

  uint4 next[kUnroll];
  bool next_present[kUnroll];
  auto load_batch = [&](int64_t base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t index = base + u * kThreads + tid;
      next_present[u] = index < vec_end;
      next[u] = next_present[u] ? __ldcs(vectors + index) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  if (vec_begin < vec_end) load_batch(vec_begin);

  if (split == 0) {
    float v[1] = {tid < head ? Load::scalar(row_ptr + tid) : -INFINITY};
    if (tid < head) sums.add<1>(v, tid, scale2, inv_t, limits);
    if (kTopK) top.offer<1>(v, tid < head, k);
  }

  int batches_since_fold = 0;
  for (int64_t base = vec_begin; base < vec_end; base += kStride) {
    uint4 current[kUnroll];
    bool present[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      current[u] = next[u];
      present[u] = next_present[u];
    }
    if (base + kStride < vec_end) load_batch(base + kStride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float v[kVec];
      Load::to_float(current[u], v);
      if (present[u]) {
        sums.add<kVec>(v, static_cast<int32_t>(head + (base + u * kThreads + tid) * kVec), scale2, inv_t,
                       limits);
      }
      if (kTopK) top.offer<kVec>(v, present[u], k);
    }
    if (++batches_since_fold == kFoldVectors / kUnroll) {
      state = merge_states(state, sums.fold(inv_t), inv_t);
      sums.reset();
      batches_since_fold = 0;
    }
  }

  if (split == p.splits - 1) {
    const int64_t index = tail_begin + tid;
    const bool in_tail = index < p.vocab;
    float v[1] = {in_tail ? Load::scalar(row_ptr + index) : -INFINITY};
    if (in_tail) sums.add<1>(v, static_cast<int32_t>(index), scale2, inv_t, limits);
    if (kTopK) top.offer<1>(v, in_tail, k);
  }
  return merge_states(state, sums.fold(inv_t), inv_t);
}

// Step 2 (kTopK): the block's k largest values into warp 0's list, through one 64-entry list per
// warp in shared memory. First every thread shares its warp's list...
__device__ __forceinline__ void share_warp_topk(const WarpTopK& top, float (*warp_lists)[kTopKCapacity]) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  warp_lists[warp][lane] = top.lo;
  warp_lists[warp][kWarpSize + lane] = top.hi;
  __syncthreads();
}

// ... then warp 0 takes in the others' lists.
__device__ __forceinline__ void gather_warp_topk(WarpTopK& top, const float (*warp_lists)[kTopKCapacity], int k) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  for (int w = 1; w < kThreads / kWarpSize; ++w) {
    const float v[2] = {warp_lists[w][lane], warp_lists[w][kWarpSize + lane]};
    top.offer<2>(v, true, k);
  }
}

// Step 3a (split rows), warp 0: publish this slice's state and top-k list to the workspace, then
// count the slice in; true in every lane of the last CTA of the row to finish, which merges them.
template <bool kTopK>
__device__ __forceinline__ bool publish_slice(const LogitStatsParams& p, int64_t row, int split,
                                              const StatsState& state, const WarpTopK& top, bool& is_last_block) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t slot = row * p.splits + split;
  if (lane == 0) p.partial_states[slot] = state;
  if (kTopK) {
    p.partial_topk[slot * kTopKCapacity + lane] = top.lo;
    p.partial_topk[slot * kTopKCapacity + kWarpSize + lane] = top.hi;
  }
  __threadfence();
  __syncwarp();
  if (lane == 0) is_last_block = atomicAdd(p.row_counters + row, 1u) == static_cast<unsigned>(p.splits - 1);
  __syncwarp();
  return is_last_block;
}

// A slice's state as another CTA published it (loads that bypass L1, which may hold stale lines).
__device__ __forceinline__ StatsState load_published_state(const StatsState* src) {
  StatsState s;
  s.ref = __ldcg(&src->ref);
  s.sum_exp = __ldcg(&src->sum_exp);
  s.wmean = __ldcg(&src->wmean);
  s.wvar = __ldcg(&src->wvar);
  s.half_gap_mean = __ldcg(&src->half_gap_mean);
  s.max_x = __ldcg(&src->max_x);
  s.count = __ldcg(&src->count);
  s.argmax = __ldcg(&src->argmax);
  return s;
}

// Step 3b (split rows), warp 0 of the last CTA of the row: merge every published slice into the
// row's state (returned in every lane) and, with kTopK, their lists into `top`; then reset the
// row's counter for the next launch.
template <bool kTopK>
__device__ __forceinline__ StatsState merge_published_slices(const LogitStatsParams& p, int64_t row, float inv_t,
                                                             WarpTopK& top) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  __threadfence();
  StatsState state = empty_state();
  for (int s = lane; s < p.splits; s += kWarpSize) {
    state = merge_states(state, load_published_state(p.partial_states + row * p.splits + s), inv_t);
  }
  state = combine_states<false>(state, nullptr, inv_t);
  if (kTopK) {
    top.reset();
    for (int s = 0; s < p.splits; ++s) {
      const float* list = p.partial_topk + (row * p.splits + s) * kTopKCapacity;
      const float v[2] = {__ldcg(list + lane), __ldcg(list + kWarpSize + lane)};
      top.offer<2>(v, true, p.topk);
    }
  }
  if (lane == 0) p.row_counters[row] = 0u;  // ready for the next launch
  return state;
}

// Step 4, warp 0 with the row's state in every lane: the top-k gap sum (warp-collective), then lane
// 0 finalizes the row and stores every requested output.
template <typename T, bool kTopK>
__device__ __forceinline__ void store_row(const LogitStatsParams& p, int64_t row, const T* row_ptr,
                                          const StatsState& state, float t, const WarpTopK& top) {
  const int keep = p.topk < state.count ? p.topk : state.count;
  double topk_gap_sum = 0.0;
  if (kTopK) topk_gap_sum = top.gap_sum_first(keep, state.max_x);
  if ((threadIdx.x & (kWarpSize - 1)) != 0) return;
  const int64_t token = p.token_ids ? p.token_ids[row] : -1;
  const bool in_range = token >= 0 && token < p.vocab;
  const float token_x = in_range ? VecLoad<T>::scalar(row_ptr + token) : 0.f;
  store_row_stats(p.out, row, state, t, in_range, token_x, topk_gap_sum, keep);
}

// At least three CTAs per SM (at most 85 registers), as the kernel had before its exact-gap sums;
// ptxas fits that without spills.
template <typename T, bool kTopK>
__global__ void __launch_bounds__(kThreads, 3) logit_stats_kernel(const LogitStatsParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.splits;
  const int split = static_cast<int>(static_cast<int64_t>(blockIdx.x) % p.splits);
  const T* row_ptr = static_cast<const T*>(p.logits) + (row / p.inner_size) * p.outer_stride +
                     (row % p.inner_size) * p.inner_stride;
  const float t = p.temperatures ? p.temperatures[row] : p.temperature;
  const float inv_t = 1.f / t;
  const RowSlices<T> cut(row_ptr, p.vocab, p.splits, p.vectors_per_split);

  WarpTopK top;
  top.reset();
  const StatsState thread_state = reduce_thread_share<T, kTopK>(p, cut, row_ptr, split, inv_t, top);

  __shared__ CombineScratch scratch;
  __shared__ float warp_lists[kTopK ? kThreads / kWarpSize : 1][kTopKCapacity];
  __shared__ bool is_last_block;
  StatsState state = combine_states<true>(thread_state, &scratch, inv_t);
  if constexpr (kTopK) share_warp_topk(top, warp_lists);
  if (threadIdx.x >= kWarpSize) return;  // warp 0 finishes the row
  if constexpr (kTopK) gather_warp_topk(top, warp_lists, p.topk);

  if (p.splits == 1 && p.partial_states != nullptr) {
    // The row is one slice: its state is the row's, kept for verify_tree's sampling pass.
    if (threadIdx.x == 0) p.partial_states[row] = state;
  } else if (p.splits > 1) {
    if (!publish_slice<kTopK>(p, row, split, state, top, is_last_block)) return;
    state = merge_published_slices<kTopK>(p, row, inv_t, top);
  }
  store_row<T, kTopK>(p, row, row_ptr, state, t, top);
}

// CTAs per row: one when rows alone fill the GPU; otherwise enough slices to put about four CTAs
// on every SM, but never fewer than one 16-byte vector per thread in a slice. Four per SM is just
// over one wave of this kernel (three resident CTAs per SM: __launch_bounds__ above). The Triton
// launcher (choose_splits in triton_kernels/logit_stats.py) aims at the same four programs per SM
// but already stops splitting at 2 x SMs rows: no measurement chose either threshold (both date from
// the first version, commit 8571162; benchmarks/NOTES.md has none), so they are left apart until a
// GPU sweep over 2-4 x SMs rows picks one for both.
constexpr int kSplitRowCapacityPerSM = 4;

inline int choose_splits(int64_t rows, int64_t vocab, int elem_bytes, int sm_count) {
  const int64_t target_ctas = static_cast<int64_t>(kSplitRowCapacityPerSM) * sm_count;
  if (rows >= target_ctas) return 1;
  const int64_t vectors = vocab * elem_bytes / 16;
  const int64_t by_target = (target_ctas + rows - 1) / rows;
  const int64_t by_work = vectors / kThreads;
  int64_t splits = by_target < by_work ? by_target : by_work;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

template <typename T>
cudaError_t launch_logit_stats(const LogitStatsParams& p, cudaStream_t stream) {
  const int64_t rows = p.outer_size * p.inner_size;
  const dim3 grid(static_cast<unsigned>(rows * p.splits));
  if (p.topk > 0) {
    logit_stats_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    logit_stats_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedecode
