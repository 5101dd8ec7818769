// fusedecode: one-pass logit statistics on CUDA. Framework-free: raw pointers in, raw pointers out;
// the torch binding (csrc/cuda/logit_stats_cuda.cu) only checks inputs, picks the dtype and stream.
//
// One CTA reduces one row, or one slice of a row when rows are too few to fill the GPU ("split"
// mode): then each CTA writes a StatsState to a workspace, and the last CTA of the row to finish
// (an atomic counter per row, reset by that CTA) merges the slices and writes the outputs, so the op
// stays one launch. Each thread reads 16-byte vectors, keeps exp-weighted sums relative to its own
// running max (rescaled only when the max grows), folds them into a StatsState every kFoldVectors
// vectors, and the block merges thread states with warp shuffles. With topk, every warp keeps the
// k largest raw logits it has seen in registers (two per lane, sorted), and only values above the
// warp's current k-th largest are inserted, so after a short warm-up the top-k costs one compare
// per element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedecode/stats_state.h"

namespace fusedecode {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kTopKCapacity = 64;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kFoldVectors = 32;
constexpr unsigned kFullMask = 0xffffffffu;

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
  float* logsumexp;
  float* entropy;
  float* varentropy;
  float* self_certainty;
  float* max_logprob;
  int64_t* argmax;
  float* token_logprob;    // when token_ids
  float* topk_confidence;  // when topk > 0
  int splits;              // CTAs per row
  StatsState* partial_states;  // [rows * splits] when splits > 1
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

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Per-thread raw sums in base 2, relative to this thread's running max (see stats_state.h).
struct ThreadSums {
  float max_x;
  float ref2;
  float s0, s1, s2, sum_x;
  int32_t argmax;
  int32_t count;

  __device__ __forceinline__ void reset() {
    max_x = -INFINITY;
    ref2 = -INFINITY;
    s0 = s1 = s2 = sum_x = 0.f;
    argmax = -1;
    count = 0;
  }

  template <int N>
  __device__ __forceinline__ void add(const float (&v)[N], int32_t first_index, float scale2) {
    float vmax = v[0], vmin = v[0];
#pragma unroll
    for (int j = 1; j < N; ++j) {
      vmax = fmaxf(vmax, v[j]);
      vmin = fminf(vmin, v[j]);
    }
    if (vmax > max_x) {  // rare after the first few vectors
      int32_t where = 0;
#pragma unroll
      for (int j = N - 1; j >= 0; --j) where = (v[j] == vmax) ? j : where;
      const float new_ref2 = vmax * scale2;
      if (count > 0) {
        // Move the sums to the new reference: d' = d + delta, weights scale by 2^delta.
        const float delta = ref2 - new_ref2;
        const float rescale = fast_exp2(delta);
        s2 = rescale * (s2 + delta * (2.f * s1 + delta * s0));
        s1 = rescale * (s1 + delta * s0);
        s0 = rescale * s0;
      }
      max_x = vmax;
      ref2 = new_ref2;
      argmax = first_index + where;
    }
    if (vmin > -INFINITY) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float d2 = fmaf(v[j], scale2, -ref2);
        const float e = fast_exp2(d2);
        const float de = d2 * e;
        s0 += e;
        s1 += de;
        s2 = fmaf(de, d2, s2);
        sum_x += v[j];
      }
      count += N;
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (v[j] != -INFINITY) {  // NaN goes through and poisons s0
          const float d2 = fmaf(v[j], scale2, -ref2);
          const float e = fast_exp2(d2);
          const float de = d2 * e;
          s0 += e;
          s1 += de;
          s2 = fmaf(de, d2, s2);
          sum_x += v[j];
          ++count;
        }
      }
    }
  }

  __device__ __forceinline__ StatsState fold(float inv_t) const {
    return fold_raw_sums(max_x, argmax, s0, s1, s2, sum_x, count, inv_t, false);
  }
};

__device__ __forceinline__ StatsState shfl_down_state(const StatsState& s, int offset) {
  StatsState o;
  o.ref = __shfl_down_sync(kFullMask, s.ref, offset);
  o.sum_exp = __shfl_down_sync(kFullMask, s.sum_exp, offset);
  o.wmean = __shfl_down_sync(kFullMask, s.wmean, offset);
  o.wvar = __shfl_down_sync(kFullMask, s.wvar, offset);
  o.umean = __shfl_down_sync(kFullMask, s.umean, offset);
  o.max_x = __shfl_down_sync(kFullMask, s.max_x, offset);
  o.count = __shfl_down_sync(kFullMask, s.count, offset);
  o.argmax = __shfl_down_sync(kFullMask, s.argmax, offset);
  return o;
}

__device__ __forceinline__ StatsState warp_merge(StatsState s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) s = merge_states(s, shfl_down_state(s, offset));
  return s;  // lane 0 holds the warp's state
}

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

  // Sum of the first `n` entries (n <= k), valid in every lane.
  __device__ __forceinline__ float sum_first(int n) const {
    const int lane = threadIdx.x & (kWarpSize - 1);
    float part = (lane < n ? lo : 0.f) + (kWarpSize + lane < n ? hi : 0.f);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) part += __shfl_xor_sync(kFullMask, part, offset);
    return part;
  }
};

template <typename T, bool kTopK>
__global__ void __launch_bounds__(kThreads) logit_stats_kernel(const LogitStatsParams p) {
  using Load = VecLoad<T>;
  constexpr int kVec = Load::kVec;
  constexpr int kWarps = kThreads / kWarpSize;

  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.splits;
  const int split = static_cast<int>(static_cast<int64_t>(blockIdx.x) % p.splits);
  const int tid = threadIdx.x;
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;

  const T* row_ptr = static_cast<const T*>(p.logits) + (row / p.inner_size) * p.outer_stride +
                     (row % p.inner_size) * p.inner_stride;
  const float t = p.temperatures ? p.temperatures[row] : p.temperature;
  const float inv_t = 1.f / t;
  const float scale2 = inv_t * kLog2e;

  // Scalar head up to the first 16-byte boundary, aligned vectors, scalar tail.
  const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(row_ptr) % 16) / sizeof(T));
  const int64_t head = misaligned ? min64(kVec - misaligned, p.vocab) : 0;
  const int64_t num_vectors = (p.vocab - head) / kVec;
  const int64_t tail_begin = head + num_vectors * kVec;
  const int64_t per_split = (num_vectors + p.splits - 1) / p.splits;
  const int64_t vec_begin = min64(num_vectors, split * per_split);
  const int64_t vec_end = min64(num_vectors, vec_begin + per_split);
  const uint4* vectors = reinterpret_cast<const uint4*>(row_ptr + head);

  ThreadSums sums;
  sums.reset();
  StatsState state = empty_state();
  WarpTopK top;
  top.reset();
  const int k = p.topk;

  if (split == 0) {
    float v[1] = {tid < head ? Load::scalar(row_ptr + tid) : -INFINITY};
    if (tid < head) sums.add<1>(v, tid, scale2);
    if (kTopK) top.offer<1>(v, tid < head, k);
  }

  int vectors_since_fold = 0;
  for (int64_t base = vec_begin; base < vec_end; base += kThreads * kUnroll) {
    uint4 raw[kUnroll];
    bool present[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t index = base + u * kThreads + tid;
      present[u] = index < vec_end;
      raw[u] = present[u] ? __ldcs(vectors + index) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float v[kVec];
      Load::to_float(raw[u], v);
      if (present[u]) {
        sums.add<kVec>(v, static_cast<int32_t>(head + (base + u * kThreads + tid) * kVec), scale2);
        if (++vectors_since_fold == kFoldVectors) {
          state = merge_states(state, sums.fold(inv_t));
          sums.reset();
          vectors_since_fold = 0;
        }
      }
      if (kTopK) top.offer<kVec>(v, present[u], k);
    }
  }

  if (split == p.splits - 1) {
    const int64_t index = tail_begin + tid;
    const bool in_tail = index < p.vocab;
    float v[1] = {in_tail ? Load::scalar(row_ptr + index) : -INFINITY};
    if (in_tail) sums.add<1>(v, static_cast<int32_t>(index), scale2);
    if (kTopK) top.offer<1>(v, in_tail, k);
  }

  // Block reduction: warps, then warp 0.
  state = warp_merge(merge_states(state, sums.fold(inv_t)));
  __shared__ StatsState warp_states[kWarps];
  __shared__ float warp_lists[kTopK ? kWarps : 1][kTopKCapacity];
  __shared__ bool is_last_block;
  if (lane == 0) warp_states[warp] = state;
  if constexpr (kTopK) {
    warp_lists[warp][lane] = top.lo;
    warp_lists[warp][kWarpSize + lane] = top.hi;
  }
  __syncthreads();
  if (warp != 0) return;

  state = lane < kWarps ? warp_states[lane] : empty_state();
  state = warp_merge(state);
  if constexpr (kTopK) {
    for (int w = 1; w < kWarps; ++w) {
      const float v[2] = {warp_lists[w][lane], warp_lists[w][kWarpSize + lane]};
      top.offer<2>(v, true, k);
    }
  }

  if (p.splits > 1) {
    // Publish this slice; the last CTA of the row merges all slices.
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
    if (!is_last_block) return;
    __threadfence();
    state = empty_state();
    for (int s = lane; s < p.splits; s += kWarpSize) {
      const StatsState* src = p.partial_states + row * p.splits + s;
      StatsState other;
      other.ref = __ldcg(&src->ref);
      other.sum_exp = __ldcg(&src->sum_exp);
      other.wmean = __ldcg(&src->wmean);
      other.wvar = __ldcg(&src->wvar);
      other.umean = __ldcg(&src->umean);
      other.max_x = __ldcg(&src->max_x);
      other.count = __ldcg(&src->count);
      other.argmax = __ldcg(&src->argmax);
      state = merge_states(state, other);
    }
    state = warp_merge(state);
    if (kTopK) {
      top.reset();
      for (int s = 0; s < p.splits; ++s) {
        const float* list = p.partial_topk + (row * p.splits + s) * kTopKCapacity;
        const float v[2] = {__ldcg(list + lane), __ldcg(list + kWarpSize + lane)};
        top.offer<2>(v, true, k);
      }
    }
    if (lane == 0) p.row_counters[row] = 0u;  // ready for the next launch
  }

  // Lane 0 holds the row's state; broadcast what the top-k sum needs.
  const int32_t count = __shfl_sync(kFullMask, state.count, 0);
  float topk_sum = 0.f;
  const int keep = k < count ? k : count;
  if (kTopK) topk_sum = top.sum_first(keep);
  if (lane != 0) return;

  const StatsFields f = finalize_state(state, temperature_is_valid(t));
  p.logsumexp[row] = f.logsumexp;
  p.entropy[row] = f.entropy;
  p.varentropy[row] = f.varentropy;
  p.self_certainty[row] = f.self_certainty;
  p.max_logprob[row] = f.max_logprob;
  p.argmax[row] = f.argmax;
  if (p.token_ids) {
    const int64_t token = p.token_ids[row];
    const bool in_range = token >= 0 && token < p.vocab;
    const float x = in_range ? Load::scalar(row_ptr + token) : 0.f;
    p.token_logprob[row] = (f.valid && in_range) ? x * inv_t - f.logsumexp : __int_as_float(0x7fc00000);
  }
  if (kTopK) {
    p.topk_confidence[row] =
        f.valid ? f.logsumexp - inv_t * topk_sum / static_cast<float>(keep) : __int_as_float(0x7fc00000);
  }
}

// CTAs per row: one when rows alone fill the GPU; otherwise enough slices to put about four CTAs
// on every SM, but never fewer than one 16-byte vector per thread in a slice.
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
