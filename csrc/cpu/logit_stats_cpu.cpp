// cpp backend of logit_stats: one pass per row over the logits, 8-lane SIMD, parallel over rows and,
// when there are fewer rows than threads, over vocabulary slices that are merged afterwards.
//
// Each row is read once from memory in chunks of kChunk entries. A chunk is converted to float in an
// L1-resident buffer, scanned once for its max/argmax/min (and NaN or +inf), then once more for the
// exp-weighted sums relative to the chunk max (far entries weigh exactly 0). Chunk sums are folded
// into a StatsState and merged (stats_state.h), which bounds float32 cancellation by the chunk size
// whatever V is.
#include "simd.h"
#include "slice_reduce.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace fusedecode {
namespace cpu {
namespace {

using simd::f32x8;
using simd::i32x8;
using simd::kLanes;

constexpr int64_t kChunk = 1024;

FD_ALWAYS_INLINE void to_float(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }

FD_ALWAYS_INLINE void to_float(const c10::BFloat16* src, int64_t n, float* dst) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    simd::u16x8 h;
    std::memcpy(&h, bits + i, sizeof(h));
    const simd::u32x8 widened = __builtin_convertvector(h, simd::u32x8) << 16;
    std::memcpy(dst + i, &widened, sizeof(widened));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

FD_ALWAYS_INLINE void to_float(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__FLT16_MAX__)
  typedef _Float16 f16x8 __attribute__((vector_size(16)));
  for (; i + kLanes <= n; i += kLanes) {
    f16x8 h;
    std::memcpy(&h, src + i, sizeof(h));
    const f32x8 widened = __builtin_convertvector(h, f32x8);
    std::memcpy(dst + i, &widened, sizeof(widened));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

struct ChunkSums {
  float s0, s1, s2;
  float gap_sum;  // sum of x - max (narrow) or of (x - max) * kWideScale (wide)
  int32_t count;
};

// The smallest finite entry of a chunk that also holds -inf (masked) entries.
FD_ALWAYS_INLINE float finite_minimum(const float* buffer, int64_t padded) {
  f32x8 lane_min = simd::splat(kInf);
  for (int64_t i = 0; i < padded; i += kLanes) {
    const f32x8 v = simd::load(buffer + i);
    lane_min = simd::vmin(lane_min, simd::select(v > simd::splat(-kInf), v, simd::splat(kInf)));
  }
  float result = kInf;
  for (int l = 0; l < kLanes; ++l) result = std::min(result, lane_min[l]);
  return result;
}

// Pass 2 over one chunk: exp-weighted sums relative to the chunk max, in base 2. kMasked: the chunk
// holds -inf entries (they add nothing). kWideSum: some gap x - max is too large to sum as it is
// (see GapLimits in stats_state.h), so gaps are summed times kWideScale. kRobustExp: some gap times
// scale2 would overflow (or scale2 did), so exponents come from robust_exp2_arg. Otherwise
// d2 = (x - max) * scale2 with the max at exactly 0 and gaps summed as they are.
template <bool kMasked, bool kWideSum, bool kRobustExp>
FD_ALWAYS_INLINE ChunkSums chunk_sums(const float* buffer, int64_t n, int64_t padded, float chunk_max, float inv_t) {
  const f32x8 zero = simd::splat(0.f);
  const f32x8 max_v = simd::splat(chunk_max);
  const f32x8 scale2_v = simd::splat(inv_t * kLog2e);
  const f32x8 wide_scale = simd::splat(kWideScale);
  const f32x8 wide_shift = simd::splat(-chunk_max * kWideScale);
  const f32x8 half_max = simd::splat(0.5f * chunk_max);
  const f32x8 inv_t_v = simd::splat(inv_t);
  f32x8 s0 = zero, s1 = zero, s2 = zero, gaps = zero;
  i32x8 finite_count = simd::splat_i(0);
  for (int64_t i = 0; i < padded; i += kLanes) {
    const f32x8 v = simd::load(buffer + i);
    const f32x8 diff = v - max_v;  // -inf where it overflows (wide chunks only)
    f32x8 gap = kWideSum ? v * wide_scale + wide_shift : diff;
    f32x8 d2;
    if constexpr (kRobustExp) {  // robust_exp2_arg (stats_state.h), eight lanes at a time
      const f32x8 half = v * simd::splat(0.5f) - half_max;
      const f32x8 scaled = inv_t >= 1.f ? (half + half) * inv_t_v : (half * inv_t_v) * simd::splat(2.f);
      d2 = simd::vmax(scaled * simd::splat(kLog2e), simd::splat(-kFarExp2));
    } else {
      d2 = diff * scale2_v;
    }
    f32x8 e;
    if constexpr (kMasked) {
      const i32x8 finite = v > simd::splat(-kInf);
      gap = simd::select(finite, gap, zero);
      d2 = simd::select(finite, d2, zero);
      e = simd::select(finite, simd::exp2_nonpositive(d2), zero);
      finite_count -= finite;  // comparisons give -1 for true
    } else {
      e = simd::exp2_nonpositive(d2);  // exactly 0 for far entries, so d2 * e stays 0
    }
    const f32x8 de = d2 * e;
    s0 += e;
    s1 += de;
    s2 += de * d2;
    gaps += gap;
  }
  int32_t count = static_cast<int32_t>(n);
  if constexpr (kMasked) {
    count = 0;
    for (int l = 0; l < kLanes; ++l) count += finite_count[l];
  }
  return {simd::hsum(s0), simd::hsum(s1), simd::hsum(s2), simd::hsum(gaps), count};
}

// chunk_sums with its three choices made at run time (eight instantiations, one branch per chunk).
template <bool kMasked>
FD_ALWAYS_INLINE ChunkSums chunk_sums_for(bool wide_sum, bool robust_exp, const float* buffer, int64_t n,
                                          int64_t padded, float chunk_max, float inv_t) {
  if (wide_sum) {
    return robust_exp ? chunk_sums<kMasked, true, true>(buffer, n, padded, chunk_max, inv_t)
                      : chunk_sums<kMasked, true, false>(buffer, n, padded, chunk_max, inv_t);
  }
  return robust_exp ? chunk_sums<kMasked, false, true>(buffer, n, padded, chunk_max, inv_t)
                    : chunk_sums<kMasked, false, false>(buffer, n, padded, chunk_max, inv_t);
}

template <typename scalar_t>
FD_ALWAYS_INLINE void accumulate_slice(const scalar_t* row, int64_t begin, int64_t end, float inv_t,
                                       SliceResult& out) {
  alignas(32) float buffer[kChunk];
  const GapLimits limits = gap_limits(inv_t * kLog2e, static_cast<float>(kChunk));
  const i32x8 lane_index{0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t chunk_begin = begin; chunk_begin < end; chunk_begin += kChunk) {
    const int64_t n = std::min(kChunk, end - chunk_begin);
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    to_float(row + chunk_begin, n, buffer);
    for (int64_t i = n; i < padded; ++i) buffer[i] = -kInf;

    // Pass 1: lane-wise max with first index, min (any -inf?) and NaN/+inf detection.
    f32x8 lane_max = simd::splat(-kInf);
    f32x8 lane_min = simd::splat(kInf);
    i32x8 lane_arg = simd::splat_i(0);
    i32x8 poison = simd::splat_i(0);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const f32x8 v = simd::load(buffer + i);
      const i32x8 greater = v > lane_max;
      lane_max = simd::select(greater, v, lane_max);
      lane_arg = simd::select(greater, lane_index + simd::splat_i(static_cast<int32_t>(i)), lane_arg);
      lane_min = simd::vmin(lane_min, v);
      poison |= (v != v) | (v == simd::splat(kInf));
    }
    if (simd::any(poison)) {
      out.state = merge_states(out.state, fold_raw_sums(0.f, 0, 0.f, 0.f, 0.f, 0.f, 0.f, 0, inv_t, true), inv_t);
      return;  // the row is NaN whatever follows
    }
    float chunk_max = -kInf;
    int32_t chunk_arg = 0;
    float chunk_min = kInf;
    for (int l = 0; l < kLanes; ++l) {
      if (lane_max[l] > chunk_max || (lane_max[l] == chunk_max && lane_arg[l] < chunk_arg)) {
        chunk_max = lane_max[l];
        chunk_arg = lane_arg[l];
      }
      chunk_min = std::min(chunk_min, lane_min[l]);
    }
    if (chunk_max == -kInf) continue;  // every entry masked

    // Pass 2, specialised on what the chunk holds (the common case: no -inf, every gap narrow).
    const bool masked = chunk_min == -kInf;
    const float widest = (masked ? finite_minimum(buffer, padded) : chunk_min) - chunk_max;
    const bool wide = !(widest >= -limits.sum);
    const bool robust_exp = !(widest >= -limits.exp);
    const ChunkSums sums =
        masked ? chunk_sums_for<true>(wide, robust_exp, buffer, n, padded, chunk_max, inv_t)
               : chunk_sums_for<false>(wide, robust_exp, buffer, n, padded, chunk_max, inv_t);
    const StatsState chunk_state =
        fold_raw_sums(chunk_max, static_cast<int32_t>(chunk_begin) + chunk_arg, sums.s0, sums.s1, sums.s2,
                      wide ? 0.f : sums.gap_sum, wide ? sums.gap_sum : 0.f, sums.count, inv_t, false);
    out.state = merge_states(out.state, chunk_state, inv_t);

    if (out.top.k > 0 && chunk_max > out.top.threshold()) {
      for (int64_t i = 0; i < n; ++i) {
        if (buffer[i] > out.top.threshold()) out.top.push(buffer[i]);
      }
    }
  }
}

}  // namespace

// Multiversioned entry points (one clone per instruction set, picked at load time).
FD_CPU_MULTIVERSION void reduce_slice(const float* row, int64_t b, int64_t e, float inv_t, SliceResult& out) {
  accumulate_slice(row, b, e, inv_t, out);
}
FD_CPU_MULTIVERSION void reduce_slice(const c10::Half* row, int64_t b, int64_t e, float inv_t, SliceResult& out) {
  accumulate_slice(row, b, e, inv_t, out);
}
FD_CPU_MULTIVERSION void reduce_slice(const c10::BFloat16* row, int64_t b, int64_t e, float inv_t,
                                      SliceResult& out) {
  accumulate_slice(row, b, e, inv_t, out);
}

namespace {

LogitStatsOutputs::Returns logit_stats_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& temperature,
                                           double temperature_scalar, const c10::optional<at::Tensor>& token_ids,
                                           int64_t topk) {
  const RowLayout layout = check_logit_stats_inputs(logits, temperature, token_ids, topk);
  LogitStatsOutputs outputs =
      allocate_logit_stats_outputs(logits, {logits.size(0) * logits.size(1)}, token_ids.has_value(), topk > 0);
  const int64_t rows = layout.num_rows();
  if (rows == 0) return outputs.returns();
  const StatsOutputPointers out = outputs.pointers(token_ids.has_value(), topk > 0);
  const float* temperatures = temperature.has_value() ? temperature->const_data_ptr<float>() : nullptr;
  const int64_t* ids = token_ids.has_value() ? token_ids->const_data_ptr<int64_t>() : nullptr;
  const float t_scalar = static_cast<float>(temperature_scalar);
  auto row_temperature = [&](int64_t r) { return temperatures ? temperatures[r] : t_scalar; };
  // Split a row across threads only when rows alone cannot keep them busy, and never into slices
  // too small to amortise a merge.
  constexpr int64_t kMinSlice = 16384;
  const int64_t threads = at::get_num_threads();
  const int64_t slices = rows >= threads ? 1
                                         : std::max<int64_t>(1, std::min<int64_t>((threads + rows - 1) / rows,
                                                                                  layout.vocab / kMinSlice));
  const int64_t slice_len = (layout.vocab + slices - 1) / slices;
  dispatch_cpu_float(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    reduce_rows(logits.const_data_ptr<scalar_t>(), layout, row_temperature, ids, topk, slice_len, out, nullptr);
  });
  return outputs.returns();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedecode, CPU, m) { m.impl("logit_stats", &logit_stats_cpu); }

}  // namespace cpu
}  // namespace fusedecode
