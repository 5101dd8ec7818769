// The part of CUDA the project's kernels use, for g++ on the CPU: qualifiers, built-in variables,
// vector and 16-bit types, warp collectives, barriers, atomics, cache-hinted loads, fast math and
// the launch that the translation step (translate.py) writes for `kernel<<<...>>>(...)`.
//
// What is deliberately missing (a kernel that uses it does not compile here): dynamic shared memory,
// __constant__, textures, cooperative groups, __activemask (which lanes are converged is a property
// of the GPU's scheduling that the emulator does not model).
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "fdemu/half.h"
#include "fdemu/runtime.h"
#include "fdemu/vector_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// translate.py rewrites every `__shared__` declaration; one left over is a compile error here.
#define __shared__ __shared___must_be_rewritten_by_translate_py

#define FDEMU_CALLER_SITE const char *fdemu_file = __builtin_FILE(), int fdemu_line = __builtin_LINE()
#define FDEMU_SITE ::fdemu::Site{fdemu_file, fdemu_line}

// ------------------------------------------------------------------------------------------------
// Barriers and warp collectives (runtime/scheduler.cpp)

inline void __syncthreads(FDEMU_CALLER_SITE) { ::fdemu::block_barrier(FDEMU_SITE); }

inline void __syncwarp(unsigned mask = 0xffffffffu, FDEMU_CALLER_SITE) {
  ::fdemu::warp_collective(::fdemu::Collective::kSyncWarp, mask, 0, 0, 0, warpSize, FDEMU_SITE);
}

namespace fdemu {

template <typename T>
uint64_t to_bits(const T& value) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t),
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T shuffle(Collective kind, unsigned mask, T var, int arg, int width, Site site) {
  return from_bits<T>(warp_collective(kind, mask, to_bits(var), static_cast<int>(sizeof(T)), arg, width, site));
}

}  // namespace fdemu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, FDEMU_CALLER_SITE) {
  return ::fdemu::shuffle(::fdemu::Collective::kShuffleIndex, mask, var, src_lane, width, FDEMU_SITE);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FDEMU_CALLER_SITE) {
  return ::fdemu::shuffle(::fdemu::Collective::kShuffleUp, mask, var, static_cast<int>(delta), width, FDEMU_SITE);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FDEMU_CALLER_SITE) {
  return ::fdemu::shuffle(::fdemu::Collective::kShuffleDown, mask, var, static_cast<int>(delta), width, FDEMU_SITE);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, FDEMU_CALLER_SITE) {
  return ::fdemu::shuffle(::fdemu::Collective::kShuffleXor, mask, var, lane_mask, width, FDEMU_SITE);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, FDEMU_CALLER_SITE) {
  return static_cast<unsigned>(
      ::fdemu::warp_collective(::fdemu::Collective::kBallot, mask, predicate != 0, 0, 0, warpSize, FDEMU_SITE));
}
inline int __any_sync(unsigned mask, int predicate, FDEMU_CALLER_SITE) {
  return static_cast<int>(
      ::fdemu::warp_collective(::fdemu::Collective::kAny, mask, predicate != 0, 0, 0, warpSize, FDEMU_SITE));
}
inline int __all_sync(unsigned mask, int predicate, FDEMU_CALLER_SITE) {
  return static_cast<int>(
      ::fdemu::warp_collective(::fdemu::Collective::kAll, mask, predicate != 0, 0, 0, warpSize, FDEMU_SITE));
}

// ------------------------------------------------------------------------------------------------
// Memory: fences, atomics (one CUDA thread runs at a time, but the builtins keep them honest),
// cache-hinted loads and stores (plain accesses: the emulator has no caches).

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  } else {
    T old = *address;
    T sum;
    do {
      sum = old + value;
    } while (!__atomic_compare_exchange(address, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
  }
}
template <typename T>
T atomicSub(T* address, T value) {
  return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicExch(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
template <typename T>
T atomicMax(T* address, T value) {
  return __atomic_fetch_max(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicMin(T* address, T value) {
  return __atomic_fetch_min(address, value, __ATOMIC_SEQ_CST);
}

namespace fdemu {
// A GPU faults on an access not aligned to its size (a 16-byte load needs a 16-byte address); the
// CPU would not, so the cache-hinted loads and stores check it. Plain dereferences are checked by
// -fsanitize=alignment (build.py), whose trap the emulator reports.
template <typename T>
void check_aligned(const volatile T* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    char message[160];
    std::snprintf(message, sizeof(message), "%s at %p: misaligned for a %zu-byte access (the GPU faults)", what,
                  const_cast<const T*>(p), alignof(T));
    fail(message);
  }
}
}  // namespace fdemu

#define FDEMU_LOAD(name)                          \
  template <typename T>                           \
  T name(const T* p) {                            \
    ::fdemu::check_aligned(p, #name);             \
    return *p;                                    \
  }
#define FDEMU_STORE(name)                         \
  template <typename T>                           \
  void name(T* p, T value) {                      \
    ::fdemu::check_aligned(p, #name);             \
    *p = value;                                   \
  }
FDEMU_LOAD(__ldg)
FDEMU_LOAD(__ldcg)
FDEMU_LOAD(__ldca)
FDEMU_LOAD(__ldcs)
FDEMU_LOAD(__ldlu)
FDEMU_LOAD(__ldcv)
FDEMU_STORE(__stcg)
FDEMU_STORE(__stcs)
FDEMU_STORE(__stwb)
#undef FDEMU_LOAD
#undef FDEMU_STORE

// ------------------------------------------------------------------------------------------------
// Integer and bit intrinsics

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __uint_as_float(unsigned x) { return fdemu::bits_float(x); }
inline unsigned __float_as_uint(float x) { return fdemu::float_bits(x); }
inline float __int_as_float(int x) { return fdemu::bits_float(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(fdemu::float_bits(x)); }
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof(d));
  return d;
}
inline long long __double_as_longlong(double d) {
  long long x;
  std::memcpy(&x, &d, sizeof(x));
  return x;
}

// ------------------------------------------------------------------------------------------------
// Fast math. The GPU computes __expf(x) as ex2.approx.ftz(x * log2(e)): the same two steps here,
// with the host's exp2f (correctly rounded or nearly) in place of ex2.approx (about 2 ulp) and the
// flush of subnormal results to zero. The last bits can therefore differ from a GPU.

inline float fdemu_flush_subnormal(float y) { return (y < 1.17549435e-38f && y > -1.17549435e-38f) ? 0.f : y; }
inline float __expf(float x) { return fdemu_flush_subnormal(exp2f(x * 1.44269504088896341f)); }
inline float __exp10f(float x) { return fdemu_flush_subnormal(exp2f(x * 3.32192809488736235f)); }
inline float __logf(float x) { return log2f(x) * 0.693147180559945309f; }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }

// ------------------------------------------------------------------------------------------------
// Runtime API

inline cudaError_t cudaGetLastError() { return ::fdemu::last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::fdemu::last_error(false); }
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorNotSupported:
      return "operation not supported";
  }
  return "unknown error";
}
// Streams are executed in order, synchronously: every asynchronous call has finished on return.
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes > 0 && ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int = 0, cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ------------------------------------------------------------------------------------------------
// Kernel launch: translate.py turns `kernel<<<grid, block, shared, stream>>>(args...)` into
// fdemu::launch_kernel(site, "kernel", kernel, grid, block, shared, stream, args...). The arguments
// are converted to the kernel's parameter types once, as the CUDA runtime copies them, and every
// thread calls the kernel with copies of them.

namespace fdemu {

template <class... Params, class... Args>
void launch_kernel(Site site, const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   size_t dynamic_shared_bytes, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  using Stored = std::tuple<std::decay_t<Params>...>;
  struct Closure {
    void (*kernel)(Params...);
    Stored params;
  };
  const Closure closure{kernel, Stored(std::forward<Args>(args)...)};
  const KernelEntry entry = [](const void* raw) {
    const Closure* c = static_cast<const Closure*>(raw);
    std::apply(c->kernel, c->params);
  };
  launch_grid(name, site, grid, block, dynamic_shared_bytes, stream, entry, &closure);
}

// What translate.py writes for a `__shared__` declaration, after the (static) variable itself.
#define FDEMU_SHARED_DECLARED(name)                                                                  \
  do {                                                                                               \
    static unsigned long long fdemu_epoch_##name = 0;                                                \
    ::fdemu::shared_declared(&(name), sizeof(name), &fdemu_epoch_##name, #name,                      \
                             ::fdemu::Site{__FILE__, __LINE__});                                     \
  } while (0)

}  // namespace fdemu
