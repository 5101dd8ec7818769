// Kernels that exercise the emulator itself (tests/cuda_emulation/test_emulator_runtime.py): what it
// must execute as a GPU does (warp-scoped collectives, barriers with exited threads, split-grid
// atomics) and the misuse it must report instead of hanging or guessing. Written in CUDA and
// translated like the project's kernels.
#include <cuda_runtime.h>

#include <cstdint>

#include "driver.h"
#include "fusedecode/philox.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Warp w runs 3 + 4 * w rounds of shuffles (different counts per warp, as WarpTopK::offer does),
// with a block barrier between two phases. out[thread] = the thread's final value.
__global__ void uneven_shuffles(int64_t* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t v = threadIdx.x;
  for (int round = 0; round < 3 + 4 * warp; ++round) v += __shfl_xor_sync(kFull, v, 1 << (round % 5));
  __syncthreads();
  if (warp % 2 == 1) {
    for (int round = 0; round < warp; ++round) v = __shfl_sync(kFull, v, (lane + round) % 32) + 1;
  }
  out[threadIdx.x] = v;
}

// Every shuffle kind at `width`, on int values: out[4 * t + k] for kinds idx/up/down/xor.
__global__ void shuffle_kinds(int64_t* out, int width, int arg) {
  const int t = threadIdx.x;
  const int v = 1000 + t;
  out[4 * t + 0] = __shfl_sync(kFull, v, arg, width);
  out[4 * t + 1] = __shfl_up_sync(kFull, v, arg, width);
  out[4 * t + 2] = __shfl_down_sync(kFull, v, arg, width);
  out[4 * t + 3] = __shfl_xor_sync(kFull, v, arg, width);
}

// Votes on predicate[t]: out[3 * t + k] = ballot, any, all over the whole warp.
__global__ void votes(const int64_t* predicate, int64_t* out) {
  const int t = threadIdx.x;
  const int p = static_cast<int>(predicate[t]);
  out[3 * t + 0] = __ballot_sync(kFull, p);
  out[3 * t + 1] = __any_sync(kFull, p);
  out[3 * t + 2] = __all_sync(kFull, p);
}

// Warps 1.. exit; warp 0 still meets at __syncthreads (exited threads count as arrived) and reads
// what its lanes wrote to shared memory.
__global__ void barrier_after_exit(int64_t* out) {
  __shared__ int64_t values[32];
  if (threadIdx.x >= 32) return;
  values[threadIdx.x] = 10 * threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = values[31 - threadIdx.x];
}

// Split-grid reduction with the last-block-merges pattern of logit_stats: out[0] = sum of all block
// ids, written by whichever block finishes last; out[1] = that block's id.
__global__ void last_block_merges(int64_t* partial, unsigned int* counter, int64_t* out) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = blockIdx.x;
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  __threadfence();
  int64_t sum = 0;
  for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(partial + b);
  out[0] = sum;
  out[1] = blockIdx.x;
  *counter = 0;
}

// Reads shared memory before any thread wrote it: out[t] = the byte the block found there.
__global__ void shared_uninitialised(int64_t* out) {
  __shared__ unsigned char bytes[64];
  out[blockIdx.x * blockDim.x + threadIdx.x] = bytes[threadIdx.x];
  __syncthreads();
  bytes[threadIdx.x] = 7;
}

// ---- misuse the emulator must report ----

__global__ void exited_lane_in_mask(int64_t* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, threadIdx.x, 1);
}

__global__ void divergent_barriers(int64_t* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_inside_warp_collective(int64_t* out) {
  // Lane 0 of warp 0 waits at the block barrier while its warp waits for it in a shuffle.
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = __shfl_sync(kFull, threadIdx.x, 0);
  if (threadIdx.x != 0) __syncthreads();
}

__global__ void mask_without_caller(int64_t* out) {
  out[threadIdx.x] = __shfl_sync(1u << ((threadIdx.x + 1) % 32), threadIdx.x, 0);
}

__global__ void reads_lane_outside_mask(int64_t* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, threadIdx.x, 20);
}

__global__ void mismatched_collectives(int64_t* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __ballot_sync(kFull, 1);
  } else {
    out[threadIdx.x] = __shfl_sync(kFull, threadIdx.x, 0);
  }
}

__global__ void reads_past_the_end(const int64_t* in, int64_t n, int64_t* out) {
  out[threadIdx.x] = in[n - 1 + threadIdx.x];  // thread 1 reads in[n]
}

__global__ void writes_past_the_end(int64_t* buffer, int64_t n) {
  if (threadIdx.x == 0) buffer[n] = 1;
}

__global__ void never_finishes(volatile int64_t* flag) {
  while (*flag == 0) {
  }
}

__device__ __noinline__ int64_t deep_recursion(int64_t depth) {
  volatile char frame[512];
  frame[0] = static_cast<char>(depth);
  if (depth == 0) return frame[0];
  const int64_t below = deep_recursion(depth - 1);
  return below + frame[0];  // the frame outlives the call: no tail call, the stack grows
}

__global__ void stack_overflow(int64_t* out) { out[threadIdx.x] = deep_recursion(1 << 20); }

__global__ void trivial(int64_t* out) { out[threadIdx.x] = 1; }

// A 16-byte load 8 bytes off the 16-byte grid: through __ldcs (checked) or a plain dereference
// (trapped by -fsanitize=alignment).
__global__ void misaligned_vector_load(const int64_t* in, int64_t* out, int plain) {
  const uint4* vectors = reinterpret_cast<const uint4*>(in + 1);
  const uint4 v = plain ? vectors[threadIdx.x] : __ldcs(vectors + threadIdx.x);
  out[threadIdx.x] = v.x;
}

struct ProbeCall {
  int32_t probe;
  int32_t threads;
  int32_t blocks;
  int32_t arg;
  int64_t width;
  int64_t n;
  int64_t* buffer;
  const int64_t* input;
  unsigned int* counter;
  int64_t* out;
  int64_t cuda_error;  // out: cudaGetLastError after the launch
};

void run_probe(ProbeCall& c) {
  const dim3 grid(static_cast<unsigned>(c.blocks));
  const dim3 block(static_cast<unsigned>(c.threads));
  switch (c.probe) {
    case 0: uneven_shuffles<<<grid, block>>>(c.out); break;
    case 1: shuffle_kinds<<<grid, block>>>(c.out, static_cast<int>(c.width), c.arg); break;
    case 2: votes<<<grid, block>>>(c.input, c.out); break;
    case 3: barrier_after_exit<<<grid, block>>>(c.out); break;
    case 4: last_block_merges<<<grid, block, 0, nullptr>>>(c.buffer, c.counter, c.out); break;
    case 5: shared_uninitialised<<<grid, block>>>(c.out); break;
    case 10: exited_lane_in_mask<<<grid, block>>>(c.out); break;
    case 11: divergent_barriers<<<grid, block>>>(c.out); break;
    case 12: barrier_inside_warp_collective<<<grid, block>>>(c.out); break;
    case 13: mask_without_caller<<<grid, block>>>(c.out); break;
    case 14: reads_lane_outside_mask<<<grid, block>>>(c.out); break;
    case 15: mismatched_collectives<<<grid, block>>>(c.out); break;
    case 16: reads_past_the_end<<<grid, block>>>(c.input, c.n, c.out); break;
    case 17: writes_past_the_end<<<grid, block>>>(c.buffer, c.n); break;
    case 18: never_finishes<<<grid, block>>>(c.buffer); break;
    case 19: stack_overflow<<<grid, block>>>(c.out); break;
    case 20: trivial<<<grid, block>>>(c.out); break;
    case 21: misaligned_vector_load<<<grid, block>>>(c.input, c.out, c.arg); break;
    default: fdemu::driver_error("unknown probe");
  }
  c.cuda_error = cudaGetLastError();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int fdemu_probe(ProbeCall* call) {
  auto body = [&] { run_probe(*call); };
  return fdemu::run_guarded(body);
}

// The 16-bit conversions (fdemu/half.h), for the exhaustive comparison with torch's.
extern "C" __attribute__((visibility("default"))) void fdemu_convert(int kind, const void* in, void* out, int64_t n) {
  const uint16_t* bits = static_cast<const uint16_t*>(in);
  const float* floats = static_cast<const float*>(in);
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0: static_cast<float*>(out)[i] = __half2float(__half{bits[i]}); break;
      case 1: static_cast<float*>(out)[i] = __bfloat162float(__nv_bfloat16{bits[i]}); break;
      case 2: static_cast<uint16_t*>(out)[i] = __float2half_rn(floats[i]).__x; break;
      case 3: static_cast<uint16_t*>(out)[i] = __float2bfloat16_rn(floats[i]).__x; break;
    }
  }
}

// verify_tree's random draws (csrc/include/fusedecode/philox.h), for the float64 walk of the tests.
extern "C" __attribute__((visibility("default"))) float fdemu_philox_uniform(uint64_t seed, uint64_t row,
                                                                             uint64_t node, uint32_t purpose) {
  return fusedecode::philox_uniform(seed, row, node, purpose);
}
