// Shared pieces of the cpp backend: reduce vocabulary slices of rows to mergeable states, then
// write logit_stats outputs. Used by logit_stats (csrc/cpu/logit_stats_cpu.cpp) and verify_tree
// (csrc/cpu/verify_tree_cpu.cpp).
#pragma once

#include "dispatch.h"
#include "fusedecode/stats_state.h"
#include "fusedecode/vocab_slices.h"
#include "logit_stats_op.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace fusedecode {
namespace cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The k largest raw logits of a slice (raw, because scaling by 1/T > 0 keeps the order), as a
// min-heap so the smallest kept value is the filter threshold.
struct TopK {
  int k = 0;
  int size = 0;
  float values[kMaxTopK];

  float threshold() const { return size < k ? -kInf : values[0]; }
  void push(float v) {
    if (size < k) {
      values[size++] = v;
      std::push_heap(values, values + size, std::greater<float>());
    } else if (v > values[0]) {
      std::pop_heap(values, values + size, std::greater<float>());
      values[size - 1] = v;
      std::push_heap(values, values + size, std::greater<float>());
    }
  }
  void merge(const TopK& other) {
    for (int i = 0; i < other.size; ++i) push(other.values[i]);
  }
  // Sum of value - max_x over the kept values, in double (64 gaps of up to 2 * FLT_MAX).
  double gap_sum(float max_x) const {
    double total = 0.0;
    for (int i = 0; i < size; ++i) total += static_cast<double>(values[i]) - static_cast<double>(max_x);
    return total;
  }
};

struct SliceResult {
  StatsState state = empty_state();
  TopK top;
};

// Reduce row[begin, end) into `out` (merging with what it holds). Multiversioned (AVX2 clone).
void reduce_slice(const float* row, int64_t begin, int64_t end, float inv_t, SliceResult& out);
void reduce_slice(const c10::Half* row, int64_t begin, int64_t end, float inv_t, SliceResult& out);
void reduce_slice(const c10::BFloat16* row, int64_t begin, int64_t end, float inv_t, SliceResult& out);

// Calls f(scalar_t{}) for the float dtypes the kernels read (dispatch.h), with c10's 16-bit types.
template <class F>
void dispatch_cpu_float(at::ScalarType dtype, const char* what, F&& f) {
  dispatch_float_dtype<c10::Half, c10::BFloat16>(dtype, what, std::forward<F>(f));
}

// Reduce every row of `layout` in slices of `slice_len` tokens (vocab_slices.h), in parallel over
// (row, slice), and write the stats. With `keep_slices`, the per-slice results stay there
// ([rows * slices], row-major).
template <typename scalar_t, typename Temperature>
void reduce_rows(const scalar_t* base, const RowLayout& layout, Temperature row_temperature, const int64_t* token_ids,
                 int64_t topk, int64_t slice_len, const StatsOutputPointers& out,
                 std::vector<SliceResult>* keep_slices) {
  const int64_t rows = layout.num_rows();
  const int64_t vocab = layout.vocab;
  const VocabSlices cut{vocab, slice_len};
  const int64_t slices = cut.count();

  auto finish_row = [&](int64_t r, const SliceResult& result) {
    const int64_t token = token_ids ? token_ids[r] : -1;
    const bool in_range = token >= 0 && token < vocab;
    const float token_x = in_range ? static_cast<float>(base[layout.row_offset(r) + token]) : 0.f;
    store_row_stats(out, r, result.state, row_temperature(r), in_range, token_x, result.top.gap_sum(result.state.max_x),
                    result.top.size);
  };

  if (slices == 1 && keep_slices == nullptr) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        SliceResult result;
        result.top.k = static_cast<int>(topk);
        reduce_slice(base + layout.row_offset(r), 0, vocab, 1.f / row_temperature(r), result);
        finish_row(r, result);
      }
    });
    return;
  }
  std::vector<SliceResult> local;
  std::vector<SliceResult>& parts = keep_slices ? *keep_slices : local;
  parts.assign(rows * slices, SliceResult());
  at::parallel_for(0, rows * slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / slices;
      const int64_t slice = unit % slices;
      SliceResult& part = parts[unit];
      part.top.k = static_cast<int>(topk);
      reduce_slice(base + layout.row_offset(r), cut.begin(slice), cut.end(slice), 1.f / row_temperature(r), part);
    }
  });
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      SliceResult merged = parts[r * slices];
      for (int64_t s = 1; s < slices; ++s) {
        merged.state = merge_states(merged.state, parts[r * slices + s].state, 1.f / row_temperature(r));
        merged.top.merge(parts[r * slices + s].top);
      }
      finish_row(r, merged);
    }
  });
}

}  // namespace cpu
}  // namespace fusedecode
