// Portable 8-lane float SIMD for the CPU kernels, written with GCC/Clang vector extensions.
//
// The same source becomes AVX2+FMA code inside a `target_clones("arch=x86-64-v3")` clone, SSE2 code
// in the baseline clone, and NEON on aarch64, without per-file compiler flags and without pulling
// ATen's capability-specific Vectorized headers (and their Sleef symbols) into the extension.
#pragma once

#include <cstdint>
#include <cstring>

#define FD_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One baseline clone and one AVX2/FMA/F16C clone, picked by the loader (ifunc) on the running CPU.
#define FD_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FD_CPU_MULTIVERSION
#endif

namespace fusedecode {
namespace simd {

constexpr int kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

FD_ALWAYS_INLINE f32x8 splat(float v) { return f32x8{v, v, v, v, v, v, v, v}; }
FD_ALWAYS_INLINE i32x8 splat_i(int32_t v) { return i32x8{v, v, v, v, v, v, v, v}; }

FD_ALWAYS_INLINE f32x8 load(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FD_ALWAYS_INLINE void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

// Lane-wise select: mask lanes are all-ones (true) or zero, as vector comparisons produce.
FD_ALWAYS_INLINE f32x8 select(i32x8 mask, f32x8 a, f32x8 b) { return mask ? a : b; }
FD_ALWAYS_INLINE i32x8 select(i32x8 mask, i32x8 a, i32x8 b) { return mask ? a : b; }

FD_ALWAYS_INLINE f32x8 vmax(f32x8 a, f32x8 b) { return a > b ? a : b; }
FD_ALWAYS_INLINE f32x8 vmin(f32x8 a, f32x8 b) { return a < b ? a : b; }

FD_ALWAYS_INLINE bool any(i32x8 mask) {
  int32_t acc = 0;
  for (int i = 0; i < kLanes; ++i) acc |= mask[i];
  return acc != 0;
}

FD_ALWAYS_INLINE float hsum(f32x8 v) {
  // Pairwise, so the horizontal sum adds no more rounding than a tree.
  const float a = (v[0] + v[4]) + (v[2] + v[6]);
  const float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

// 2^x for x <= 0 (the only range the kernels need), relative error about 2e-7.
// Range reduction x = n + f with n = round(x), f in [-0.5, 0.5], then a degree-6 minimax polynomial
// for 2^f. Inputs at or below -126.5 (-inf included) give exactly 0: x is clamped at -127, where
// n = -127 makes the scale 2^n the bit pattern 0. Far entries thus weigh nothing, as in float64.
// Callers still mask -inf logits themselves (their d * 2^d would be NaN).
FD_ALWAYS_INLINE f32x8 exp2_nonpositive(f32x8 x) {
  x = vmax(x, splat(-127.f));
  const f32x8 shifted = x + splat(0.5f);
  i32x8 n = __builtin_convertvector(shifted, i32x8);  // truncates toward zero
  f32x8 nf = __builtin_convertvector(n, f32x8);
  // floor() for negative inputs: truncation rounded up, step back by one.
  const i32x8 too_big = nf > shifted;
  n = n + (too_big & splat_i(-1));
  nf = __builtin_convertvector(n, f32x8);
  const f32x8 f = x - nf;
  f32x8 p = splat(1.535336188319500e-4f);
  p = p * f + splat(1.339887440266574e-3f);
  p = p * f + splat(9.618437357674640e-3f);
  p = p * f + splat(5.550332471162809e-2f);
  p = p * f + splat(2.402264791363012e-1f);
  p = p * f + splat(6.931472028550421e-1f);
  p = p * f + splat(1.0f);
  const i32x8 bits = (n + splat_i(127)) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace simd
}  // namespace fusedecode
