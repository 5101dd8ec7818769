// fusedecode: the per-thread sums of the CUDA logit_stats kernel (logit_stats.cuh), framework-free
// and host-compilable so that tests can run the kernel's exact accumulation on the CPU
// (tests/test_cuda_host_sim.py) on machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedecode/stats_state.h"

namespace fusedecode {
namespace cuda {

// 2^x as the GPU's ex2.approx.ftz computes it; on the host exp2f with the same flush to zero.
FD_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;  // NaN passes
#endif
}

// Gaps a thread sums between two folds: at most kFoldVectors vectors plus a head and a tail element
// (with margin), the window of gap_limits.
constexpr float kThreadWindow = 512.f;

// Per-thread raw sums in base 2, relative to this thread's running max (see fold_raw_sums in
// stats_state.h). The common vector (no -inf, every gap narrow) costs what the plain sums cost; a
// vector with masked entries or far gaps takes the per-element path.
struct ThreadSums {
  float max_x;
  float s0, s1, s2;
  float narrow_gaps;  // sum of x - max_x over the narrow entries
  float wide_gaps;    // sum of (x - max_x) * kWideScale over the wide entries
  int32_t argmax;
  int32_t narrow_count;
  int32_t count;

  FD_HOST_DEVICE void reset() {
    max_x = -INFINITY;
    s0 = s1 = s2 = narrow_gaps = wide_gaps = 0.f;
    argmax = -1;
    narrow_count = count = 0;
  }

  // Move every sum to a larger max: d' = d + delta, weights scale by 2^delta (delta clamped, so a
  // far jump zeroes the weights and keeps the products finite).
  FD_HOST_DEVICE void raise_max(float new_max, int32_t where, float scale2, float inv_t, const GapLimits& limits) {
    if (count > 0) {
      const float gap = max_x - new_max;
      const float delta = gap >= -limits.exp ? clamp_far_exp2(gap * scale2) : robust_exp2_arg(max_x, new_max, inv_t);
      const float rescale = fast_exp2(delta);
      s2 = rescale * (s2 + delta * (2.f * s1 + delta * s0));
      s1 = rescale * (s1 + delta * s0);
      s0 = rescale * s0;
      const float wide_shift = fmaf(max_x, kWideScale, -new_max * kWideScale);
      wide_gaps += static_cast<float>(count - narrow_count) * wide_shift;
      if (narrow_count > 0) {
        // Every narrow gap is at most |narrow_gaps| (they are all <= 0); it grows by -gap. While that
        // stays within the limit they remain narrow, else they are summed scaled from now on.
        if (gap - narrow_gaps >= -limits.sum && -gap <= limits.sum) {
          narrow_gaps += static_cast<float>(narrow_count) * gap;
        } else {
          wide_gaps += narrow_gaps * kWideScale + static_cast<float>(narrow_count) * wide_shift;
          narrow_gaps = 0.f;
          narrow_count = 0;
        }
      }
    }
    max_x = new_max;
    argmax = where;
  }

  // One entry of a vector that holds -inf or far gaps (NaN takes the far way and poisons s0).
  FD_HOST_DEVICE void add_one(float x, float scale2, float inv_t, const GapLimits& limits) {
    const float gap = x - max_x;
    const float d2 = gap >= -limits.exp ? gap * scale2 : robust_exp2_arg(x, max_x, inv_t);
    if (gap >= -limits.sum) {
      narrow_gaps += gap;
      ++narrow_count;
    } else {
      wide_gaps += fmaf(x, kWideScale, -max_x * kWideScale);
    }
    const float e = fast_exp2(d2);
    const float de = d2 * e;
    s0 += e;
    s1 += de;
    s2 = fmaf(de, d2, s2);
    ++count;
  }

  template <int N>
  FD_HOST_DEVICE void add(const float (&v)[N], int32_t first_index, float scale2, float inv_t,
                          const GapLimits& limits) {
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
      raise_max(vmax, first_index + where, scale2, inv_t, limits);
    }
    if (vmin > -INFINITY && vmin - max_x >= -limits.both) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float gap = v[j] - max_x;  // NaN goes through and poisons s0
        const float d2 = gap * scale2;   // finite: the gap is narrow; the max gets exactly 0
        const float e = fast_exp2(d2);   // 0 for far entries (flushed), so d2 * e stays 0
        const float de = d2 * e;
        s0 += e;
        s1 += de;
        s2 = fmaf(de, d2, s2);
        narrow_gaps += gap;
      }
      narrow_count += N;
      count += N;
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (v[j] != -INFINITY) add_one(v[j], scale2, inv_t, limits);
      }
    }
  }

  FD_HOST_DEVICE StatsState fold(float inv_t) const {
    return fold_raw_sums(max_x, argmax, s0, s1, s2, narrow_gaps, wide_gaps, count, inv_t, false);
  }
};

}  // namespace cuda
}  // namespace fusedecode
