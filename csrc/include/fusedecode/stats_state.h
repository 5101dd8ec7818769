// fusedecode: the mergeable per-row state behind logit_stats.
//
// Framework-free (no torch headers): compiled by the host compiler for the CPU kernels and by nvcc
// for the CUDA kernels, so both backends share one copy of the merge and finalize math.
//
// Definitions (DESIGN section 3). Per row z = x * inv_t over the finite entries F, n = |F|,
// p = softmax(z) over F.
//   logsumexp      = ref + log s                      ref = max z, s = sum exp(z - ref)
//   entropy        = log s - wmean                    wmean = E_p[z] - ref          (<= 0)
//   varentropy     = wvar                             wvar  = Var_p[z]
//   self_certainty = log s - umean - log n            umean = mean_F(z) - ref       (<= 0)
//   max_logprob    = -log s
// Keeping every field relative to the slice's own maximum and merging with Chan's weighted-variance
// update keeps float32 accurate where the textbook E[d^2] - E[d]^2 would cancel.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fusedecode {

// Builtins rather than std::numeric_limits so nvcc needs no --expt-relaxed-constexpr for this header.
#define FD_INFINITY (__builtin_huge_valf())
#define FD_NAN (__builtin_nanf(""))

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

// Merge state of one slice of a row. An empty slice has count == 0. A slice that saw NaN or +inf
// carries sum_exp = NaN, which every merge propagates.
struct StatsState {
  float ref;      // max z of the slice
  float sum_exp;  // sum exp(z - ref)
  float wmean;    // E_p[z] - ref
  float wvar;     // Var_p[z]
  float umean;    // mean(z) - ref over the finite entries
  float max_x;    // the raw logit at argmax (kept raw so ties are decided before scaling rounds)
  int32_t count;  // finite entries
  int32_t argmax; // lowest index holding max_x
};

FD_HOST_DEVICE StatsState empty_state() {
  StatsState s;
  s.ref = -FD_INFINITY;
  s.sum_exp = 0.f;
  s.wmean = 0.f;
  s.wvar = 0.f;
  s.umean = 0.f;
  s.max_x = -FD_INFINITY;
  s.count = 0;
  s.argmax = -1;
  return s;
}

// Sums a kernel accumulates over one slice, in base 2 so the hot loop can call exp2 directly:
// d2 = (x - max_x) * inv_t * log2(e), s0 = sum 2^d2, s1 = sum d2 2^d2, s2 = sum d2^2 2^d2,
// sum_x = sum x, all over finite x. `poisoned` marks a NaN or +inf seen by the caller.
// A kernel that computes d2 = fma(x, scale2, -ref2) with a rounded ref2 = max_x * scale2 passes the
// rounding residual fma(max_x, scale2, -ref2) (the d2 of its own max element) as `residual2`; the
// sums are moved back to an exact zero at the max, so max_logprob and friends carry no error of the
// order of ulp(|z|).
FD_HOST_DEVICE StatsState fold_raw_sums(float max_x, int32_t argmax, float s0, float s1, float s2,
                                        float sum_x, int32_t count, float inv_t, bool poisoned,
                                        float residual2 = 0.f) {
  StatsState s = empty_state();
  if (count == 0 && !poisoned) return s;
  s.count = count > 0 ? count : 1;
  s.max_x = max_x;
  s.argmax = argmax;
  s.ref = max_x * inv_t;
  const float mean2 = s1 / s0;
  const float var2 = s2 / s0 - mean2 * mean2;
  s.sum_exp = (poisoned || !(max_x < FD_INFINITY)) ? FD_NAN : s0 * exp2f(-residual2);
  s.wmean = kLn2 * (mean2 - residual2);
  s.wvar = kLn2 * kLn2 * (var2 > 0.f ? var2 : 0.f);
  s.umean = (count > 0 ? (sum_x / static_cast<float>(count) - max_x) * inv_t : 0.f);
  return s;
}

// Chan et al.'s pairwise update, with exp(z - ref) weights.
FD_HOST_DEVICE StatsState merge_states(const StatsState& a, const StatsState& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  StatsState out;
  const bool take_b = b.max_x > a.max_x || (b.max_x == a.max_x && b.argmax < a.argmax);
  out.max_x = take_b ? b.max_x : a.max_x;
  out.argmax = take_b ? b.argmax : a.argmax;
  out.ref = a.ref > b.ref ? a.ref : b.ref;
  const float shift_a = a.ref - out.ref;
  const float shift_b = b.ref - out.ref;
  const float wa = a.sum_exp * expf(shift_a);
  const float wb = b.sum_exp * expf(shift_b);
  out.sum_exp = wa + wb;
  const float fa = wa / out.sum_exp;
  const float fb = wb / out.sum_exp;
  const float mean_a = a.wmean + shift_a;
  const float mean_b = b.wmean + shift_b;
  const float delta = mean_a - mean_b;
  out.wmean = fa * mean_a + fb * mean_b;
  out.wvar = fa * a.wvar + fb * b.wvar + fa * fb * delta * delta;
  out.count = a.count + b.count;
  const float na = static_cast<float>(a.count) / static_cast<float>(out.count);
  out.umean = na * (a.umean + shift_a) + (1.f - na) * (b.umean + shift_b);
  return out;
}

struct StatsFields {
  float logsumexp;
  float entropy;
  float varentropy;
  float self_certainty;
  float max_logprob;
  int64_t argmax;
  bool valid;
};

// `temperature_ok` is false for a per-row temperature that is not a positive finite number.
FD_HOST_DEVICE StatsFields finalize_state(const StatsState& s, bool temperature_ok) {
  StatsFields f;
  const float nan = FD_NAN;
  f.valid = temperature_ok && s.count > 0 && !(s.sum_exp != s.sum_exp);
  if (!f.valid) {
    f.logsumexp = f.entropy = f.varentropy = f.self_certainty = f.max_logprob = nan;
    f.argmax = -1;
    return f;
  }
  const float log_s = logf(s.sum_exp);
  f.logsumexp = s.ref + log_s;
  f.entropy = log_s - s.wmean;
  f.varentropy = s.wvar;
  f.self_certainty = log_s - s.umean - logf(static_cast<float>(s.count));
  f.max_logprob = -log_s;
  f.argmax = s.argmax;
  return f;
}

FD_HOST_DEVICE bool temperature_is_valid(float t) {
  return t > 0.f && t < FD_INFINITY;
}

// Where logit_stats writes its per-row results (token_logprob / topk_confidence: nullptr if unused).
struct StatsOutputPointers {
  float* logsumexp;
  float* entropy;
  float* varentropy;
  float* self_certainty;
  float* max_logprob;
  int64_t* argmax;
  float* token_logprob;
  float* topk_confidence;
};

// Finalize one row and store every requested output. `token_x` is the raw logit of the row's token
// (when `token_in_range`), `topk_sum` the sum of the row's `topk_kept` largest raw logits.
FD_HOST_DEVICE void store_row_stats(const StatsOutputPointers& out, int64_t row, const StatsState& state, float t,
                                    bool token_in_range, float token_x, float topk_sum, int topk_kept) {
  const StatsFields f = finalize_state(state, temperature_is_valid(t));
  const float inv_t = 1.f / t;
  out.logsumexp[row] = f.logsumexp;
  out.entropy[row] = f.entropy;
  out.varentropy[row] = f.varentropy;
  out.self_certainty[row] = f.self_certainty;
  out.max_logprob[row] = f.max_logprob;
  out.argmax[row] = f.argmax;
  if (out.token_logprob) out.token_logprob[row] = (f.valid && token_in_range) ? token_x * inv_t - f.logsumexp : FD_NAN;
  if (out.topk_confidence) {
    out.topk_confidence[row] =
        f.valid ? f.logsumexp - inv_t * topk_sum / static_cast<float>(topk_kept) : FD_NAN;
  }
}

}  // namespace fusedecode
