// fusedecode: the mergeable per-row state behind logit_stats.
//
// Framework-free (no torch headers): compiled by the host compiler for the CPU kernels and by nvcc
// for the CUDA kernels, so both backends share one copy of the merge and finalize math.
//
// Definitions (docs/semantics.md#logit_stats). Per row z = x * inv_t over the finite entries F, n = |F|,
// p = softmax(z) over F. Everything is kept relative to the row maximum max_x, never as a
// difference of two large numbers (offsets such as 1e6 + noise, tiny temperatures):
//   logsumexp       = max_x * inv_t + log s          s = sum exp(z - max z)
//   entropy         = log s - wmean                  wmean = E_p[z] - max z                (<= 0)
//   varentropy      = wvar                           wvar  = Var_p[z]
//   self_certainty  = log s - gap_z(half_gap_mean) - log n
//   max_logprob     = -log s
//   token_logprob   = gap_z((x_t - max_x) / 2) - log s
//   topk_confidence = log s - mean over the top k of (x_i - max_x) * inv_t
// with half_gap_mean = mean over F of (x - max_x) / 2 and gap_z(h) = 2 h * inv_t. Halving keeps
// every gap finite: x - max_x reaches -2 * FLT_MAX when finfo.min meets finfo.max.
//
// Far entries. A weight exp(z - max z) below about 2^-127 is exactly 0 (not the smallest normal
// number), and every product with it stays finite, so -1e20 or finfo.min logits (masking idioms) add
// nothing to s, wmean or wvar while still counting in n and in the uniform mean.
//
// Keeping every field relative to the slice's own maximum and merging with Chan's weighted-variance
// update keeps float32 accurate where the textbook E[d^2] - E[d]^2 would cancel.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedecode/stats_outputs.h"

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fusedecode {

// Builtins rather than std::numeric_limits so nvcc needs no --expt-relaxed-constexpr for this header.
#define FD_INFINITY (__builtin_huge_valf())
#define FD_NAN (__builtin_nanf(""))
#define FD_FLOAT_MAX (__FLT_MAX__)

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

// Base-2 exponents are clamped at -kFarExp2 (-inf included): 2^-150 is 0 in float32, and d * 2^d and
// d^2 * 2^d stay finite (0) there. (The CPU exp2 is 0 from -126.5 down, the GPU's flushes to zero.)
constexpr float kFarExp2 = 150.f;
// The same in natural units, for the shift between two states' maxima (exp(-128) == 0 in float32).
constexpr float kFarShift = 128.f;
// Gaps x - max_x too large to sum as they are ("wide", see GapLimits) are summed scaled by
// this exact power of two: a window of up to 2048 of them cannot overflow.
constexpr float kWideScale = 1.f / 4096.f;

// Merge state of one slice of a row. An empty slice has count == 0. A slice that saw NaN or +inf
// carries sum_exp = NaN, which every merge propagates.
struct StatsState {
  float ref;            // max_x * inv_t (+-inf when that leaves the float32 range)
  float sum_exp;        // sum exp(z - max z)
  float wmean;          // E_p[z] - max z
  float wvar;           // Var_p[z]
  float half_gap_mean;  // mean over the finite entries of (x - max_x) / 2, raw logit units
  float max_x;          // the raw logit at argmax (kept raw so ties are decided before scaling rounds)
  int32_t count;        // finite entries
  int32_t argmax;       // lowest index holding max_x
};

FD_HOST_DEVICE StatsState empty_state() {
  StatsState s;
  s.ref = -FD_INFINITY;
  s.sum_exp = 0.f;
  s.wmean = 0.f;
  s.wvar = 0.f;
  s.half_gap_mean = 0.f;
  s.max_x = -FD_INFINITY;
  s.count = 0;
  s.argmax = -1;
  return s;
}

// (x - max_x) / 2 for x <= max_x: both halves are exact, so the one rounding is that of the
// difference, and the result is never below -FLT_MAX.
FD_HOST_DEVICE float half_gap(float x, float max_x) { return 0.5f * x - 0.5f * max_x; }

// 2 h * inv_t, multiplied in the order that overflows (to -inf) only when the exact value is below
// -FLT_MAX and underflows only when it is negligible.
FD_HOST_DEVICE float scaled_half_gap(float half, float inv_t) {
  return inv_t >= 1.f ? (2.f * half) * inv_t : 2.f * (half * inv_t);
}

// (x - max_x) * inv_t without overflow in the difference.
FD_HOST_DEVICE float scaled_gap(float x, float max_x, float inv_t) { return scaled_half_gap(half_gap(x, max_x), inv_t); }

// Clamp a base-2 exponent at -kFarExp2 (-inf included); NaN passes through so that it poisons the
// sums of the kernels that detect NaN by propagation.
FD_HOST_DEVICE float clamp_far_exp2(float d2) { return d2 < -kFarExp2 ? -kFarExp2 : d2; }

// How a kernel treats a gap d = x - max_x of its window. It sums d as it is when d >= -sum (a window
// of `window` such gaps cannot overflow; exact down to subnormal gaps) and as d * kWideScale
// otherwise. Its exponent is d * scale2 when d >= -exp (finite there) and robust_exp2_arg otherwise;
// exp is -1 when scale2 itself overflowed (temperatures below log2(e) / FLT_MAX). Both limits are
// finite, so a difference that overflowed to -inf is always far. `both` is the smaller limit: a
// vector whose gaps all reach it takes the common path.
struct GapLimits {
  float sum;
  float exp;
  float both;
};

FD_HOST_DEVICE GapLimits gap_limits(float scale2, float window) {
  GapLimits limits;
  limits.sum = FD_FLOAT_MAX / (2.f * window);
  limits.exp = scale2 < FD_INFINITY ? (0.5f * FD_FLOAT_MAX) / scale2 : -1.f;
  // Never infinite: a gap that overflowed to -inf is never narrow, even when scale2 < 1/2.
  if (!(limits.exp < FD_FLOAT_MAX)) limits.exp = FD_FLOAT_MAX;
  limits.both = limits.sum < limits.exp ? limits.sum : limits.exp;
  return limits;
}

// The base-2 exponent (x - max_x) * inv_t * log2(e) for any x <= max_x, clamped at -kFarExp2:
// from the halved gap, so neither an overflowing difference (finfo.min next to finfo.max at
// T > 1e36, where the scaled gap is finite again) nor an overflowing scale2 (T < 4e-39) is lost.
FD_HOST_DEVICE float robust_exp2_arg(float x, float max_x, float inv_t) {
  return clamp_far_exp2(scaled_gap(x, max_x, inv_t) * kLog2e);
}

// exp((max_x - out_max_x) * inv_t), the weight of a state relative to a larger maximum, as the
// clamped shift (natural units): far states weigh exactly 0 and shift * 0 stays 0.
FD_HOST_DEVICE float merge_shift(float max_x, float out_max_x, float inv_t) {
  const float shift = scaled_gap(max_x, out_max_x, inv_t);
  return shift < -kFarShift ? -kFarShift : shift;
}

// Sums a kernel accumulates over one window of a slice, in base 2 so the hot loop can call exp2
// directly, all relative to the window's max max_x (the max itself has d = 0 exactly) and over the
// finite x: d2 = (x - max_x) * inv_t * log2(e) clamped at -kFarExp2, s0 = sum 2^d2,
// s1 = sum d2 2^d2, s2 = sum d2^2 2^d2; narrow_gap_sum = sum of the narrow gaps x - max_x,
// wide_gap_sum = sum of the wide gaps times kWideScale (see GapLimits).
// `poisoned` marks a NaN or +inf seen by the caller.
FD_HOST_DEVICE StatsState fold_raw_sums(float max_x, int32_t argmax, float s0, float s1, float s2, float narrow_gap_sum,
                                        float wide_gap_sum, int32_t count, float inv_t, bool poisoned) {
  StatsState s = empty_state();
  if (count == 0 && !poisoned) return s;
  s.count = count > 0 ? count : 1;
  s.max_x = max_x;
  s.argmax = argmax;
  s.ref = max_x * inv_t;
  const float mean2 = s1 / s0;
  const float var2 = s2 / s0 - mean2 * mean2;
  s.sum_exp = (poisoned || !(max_x < FD_INFINITY)) ? FD_NAN : s0;
  s.wmean = kLn2 * mean2;
  s.wvar = kLn2 * kLn2 * (var2 > 0.f ? var2 : 0.f);
  // Means of each part over all `count` entries, then halved: every intermediate stays finite.
  const float n = static_cast<float>(s.count);
  s.half_gap_mean = 0.5f * (narrow_gap_sum / n) + (0.5f / kWideScale) * (wide_gap_sum / n);
  return s;
}

// Chan et al.'s pairwise update, with exp(z - max z) weights; the gap means merge as count-weighted
// means of gaps to the common maximum (never as sums, which could overflow).
FD_HOST_DEVICE StatsState merge_states(const StatsState& a, const StatsState& b, float inv_t) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  StatsState out;
  const bool take_b = b.max_x > a.max_x || (b.max_x == a.max_x && b.argmax < a.argmax);
  out.max_x = take_b ? b.max_x : a.max_x;
  out.argmax = take_b ? b.argmax : a.argmax;
  out.ref = out.max_x * inv_t;
  const float shift_a = merge_shift(a.max_x, out.max_x, inv_t);
  const float shift_b = merge_shift(b.max_x, out.max_x, inv_t);
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
  out.half_gap_mean = na * (a.half_gap_mean + half_gap(a.max_x, out.max_x)) +
                      (1.f - na) * (b.half_gap_mean + half_gap(b.max_x, out.max_x));
  return out;
}

// One row's outputs (FUSEDECODE_LOGIT_STATS_OUTPUTS). finalize_state fills those every call computes;
// store_row_stats the others, when asked for.
struct StatsFields {
#define FUSEDECODE_FIELD_MEMBER(name, type, requested_by) type name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_FIELD_MEMBER)
#undef FUSEDECODE_FIELD_MEMBER
  bool valid;
};

// What an invalid row (NaN in, no finite logit, a bad temperature) holds, by element type: NaN for a
// statistic, -1 for an index.
FD_HOST_DEVICE void set_invalid(float& value) { value = FD_NAN; }
FD_HOST_DEVICE void set_invalid(int64_t& value) { value = -1; }

// `temperature_ok` is false for a per-row temperature outside the valid range (temperature_is_valid).
FD_HOST_DEVICE StatsFields finalize_state(const StatsState& s, float inv_t, bool temperature_ok) {
  StatsFields f;
  f.valid = temperature_ok && s.count > 0 && !(s.sum_exp != s.sum_exp);
  if (!f.valid) {  // every output every call computes; store_row_stats sets the others
#define FUSEDECODE_SET_INVALID(name, type, requested_by) FUSEDECODE_IF_ALWAYS(requested_by, set_invalid(f.name);)
    FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_SET_INVALID)
#undef FUSEDECODE_SET_INVALID
    return f;
  }
  const float log_s = logf(s.sum_exp);
  f.logsumexp = s.max_x * inv_t + log_s;
  f.entropy = log_s - s.wmean;
  f.varentropy = s.wvar;
  f.self_certainty = log_s - scaled_half_gap(s.half_gap_mean, inv_t) - logf(static_cast<float>(s.count));
  f.max_logprob = -log_s;
  f.argmax = s.argmax;
  return f;
}

// Finite, > 0, and 1 / t finite in float32 (about 3e-39 < t < 3.4e38).
FD_HOST_DEVICE bool temperature_is_valid(float t) {
  return t > 0.f && t < FD_INFINITY && 1.f / t < FD_INFINITY;
}

// Where logit_stats writes its per-row results, one pointer per output in the list's order
// (nullptr for an output the call does not ask for).
struct StatsOutputPointers {
#define FUSEDECODE_POINTER_MEMBER(name, type, requested_by) type* name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_POINTER_MEMBER)
#undef FUSEDECODE_POINTER_MEMBER
};

// Store every output of `f` that `out` asks for (those every call computes unconditionally).
FD_HOST_DEVICE void store_fields(const StatsOutputPointers& out, int64_t row, const StatsFields& f) {
#define FUSEDECODE_STORE_FIELD(name, type, requested_by) \
  if (RequestedBy::requested_by == RequestedBy::always || out.name) out.name[row] = f.name;
  FUSEDECODE_LOGIT_STATS_OUTPUTS(FUSEDECODE_STORE_FIELD)
#undef FUSEDECODE_STORE_FIELD
}

// Finalize one row and store every requested output. `token_x` is the raw logit of the row's token
// (when `token_in_range`); `topk_gap_sum` is the sum of x_i - max_x over the row's `topk_kept`
// largest raw logits, in double (64 gaps of up to 2 * FLT_MAX; once per row).
FD_HOST_DEVICE void store_row_stats(const StatsOutputPointers& out, int64_t row, const StatsState& state, float t,
                                    bool token_in_range, float token_x, double topk_gap_sum, int topk_kept) {
  const float inv_t = 1.f / t;
  StatsFields f = finalize_state(state, inv_t, temperature_is_valid(t));
  if (out.token_logprob) {
    f.token_logprob = (f.valid && token_in_range) ? scaled_gap(token_x, state.max_x, inv_t) + f.max_logprob : FD_NAN;
  }
  if (out.topk_confidence) {
    const double mean_gap = topk_kept > 0 ? topk_gap_sum / topk_kept : 0.0;
    f.topk_confidence =
        f.valid ? static_cast<float>(static_cast<double>(-f.max_logprob) - mean_gap * static_cast<double>(inv_t))
                : FD_NAN;
  }
  store_fields(out, row, f);
}

}  // namespace fusedecode
