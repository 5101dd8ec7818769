// CUDA's 16-bit float types for the CPU emulation: bit-exact storage and conversions (IEEE binary16
// and bfloat16, round to nearest even), written from their bit layouts so that they do not depend on
// the host compiler's _Float16 or __bf16 support. tests/cuda_emulation/test_emulator_runtime.py
// compares them with torch's conversions on every 16-bit pattern.
#pragma once

#include <cstdint>
#include <cstring>

#include "fdemu/vector_types.h"

namespace fdemu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// binary16 -> binary32: exact for every pattern (subnormals become normal floats; NaN stays NaN
// with its payload moved up, as the GPU's cvt.f32.f16 does).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_float(sign);
  // Subnormal: value = mantissa * 2^-24; normalise.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  return bits_float(sign | ((113u - shift) << 23) | ((mantissa & 0x3ffu) << 13));
}

// binary32 -> binary16, round to nearest, ties to even; overflow to +-inf, NaN to a quiet NaN.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x1ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 2^16: inf
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent < -25) return sign;  // below half the smallest subnormal (2^-25): +-0
  // The 24-bit significand (with its hidden bit), shifted so that the binary16 result's last bit
  // is bit 0; `shift` bits are rounded away.
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const int shift = exponent < -14 ? 13 + (-14 - exponent) : 13;
  const uint32_t kept = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u);
  const uint32_t half_way = 1u << (shift - 1);
  uint32_t rounded = kept + ((rest > half_way || (rest == half_way && (kept & 1u))) ? 1u : 0u);
  if (exponent < -14) return static_cast<uint16_t>(sign | rounded);  // subnormal (a carry makes it normal)
  // Normal: drop the hidden bit and add the biased exponent; a carry out of the mantissa bumps it.
  rounded += static_cast<uint32_t>(exponent + 14) << 10;
  return static_cast<uint16_t>(sign | rounded);
}

inline float bfloat16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest, ties to even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

}  // namespace fdemu

struct __half {
  uint16_t __x;
};

struct __half2 {
  __half x, y;
};

struct __nv_bfloat16 {
  uint16_t __x;
};

struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return fdemu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { return __half{fdemu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return fdemu::bfloat16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{fdemu::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
