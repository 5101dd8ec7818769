// The vocabulary slices of a row: how the statistics pass cuts a row when it reduces slices to
// mergeable states (stats_state.h) and merges them, and how verify_tree's sampling pass finds the
// slice holding the drawn probability mass again and re-reads only that slice. Written once here
// for the cpp backend; the CUDA kernels cut rows in 16-byte vectors (RowSlices in logit_stats.cuh),
// the Triton kernels in triton_kernels/logit_stats.py (slice_bounds).
#pragma once

#include <cstdint>

#include "fusedecode/stats_state.h"

namespace fusedecode {

// Tokens per slice of a row in verify_tree's statistics pass (the Triton backend's SLICE_TOKENS in
// triton_kernels/verify_tree.py is the same number).
constexpr int64_t kVerifySliceTokens = 4096;

// Slice s of a row of `vocab` tokens covers tokens [s * slice_len, min((s + 1) * slice_len, vocab)).
struct VocabSlices {
  int64_t vocab;
  int64_t slice_len;

  FD_HOST_DEVICE int64_t count() const { return (vocab + slice_len - 1) / slice_len; }
  FD_HOST_DEVICE int64_t begin(int64_t slice) const { return slice * slice_len; }
  FD_HOST_DEVICE int64_t end(int64_t slice) const {
    const int64_t stop = begin(slice) + slice_len;
    return stop < vocab ? stop : vocab;
  }
};

}  // namespace fusedecode
