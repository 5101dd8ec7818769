// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11), host and device.
//
// verify_tree keys every draw by (seed, batch row, node, purpose), so a result never depends on
// how the work was split across threads or CTAs.
#pragma once

#include <cstdint>

#include "fusedecode/stats_state.h"

namespace fusedecode {

enum RandomPurpose : uint32_t { kSampleDraw = 0, kAcceptDraw = 1 };

FD_HOST_DEVICE uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first of the four 32-bit outputs of Philox4x32-10 for `counter` under `key`.
FD_HOST_DEVICE uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi32(kMul0, c0), lo0 = kMul0 * c0;
    const uint32_t hi1 = mul_hi32(kMul1, c2), lo1 = kMul1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c0;
}

// A uniform float in [0, 1) (24 random bits) for one (seed, row, node, purpose).
FD_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t row, uint64_t node, uint32_t purpose) {
  const uint32_t bits = philox4x32_10_first(static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                            static_cast<uint32_t>(node), purpose, static_cast<uint32_t>(seed),
                                            static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fusedecode
