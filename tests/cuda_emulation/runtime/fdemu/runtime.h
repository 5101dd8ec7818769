// The interface between the CUDA compatibility header (fdemu/cuda.h) and the emulator's scheduler
// (runtime/scheduler.cpp): kernel launches, block barriers, warp collectives, shared memory, and
// the guarded calls through which the drivers run kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fdemu/vector_types.h"

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};

// The built-in variables of the running CUDA thread; the scheduler sets them whenever it switches to
// a thread, so kernel code reads them as on the GPU.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace fdemu {

// Where a barrier, collective or launch is in the source, for error messages.
struct Site {
  const char* file;
  int line;
};

enum class Collective : int {
  kShuffleIndex,
  kShuffleUp,
  kShuffleDown,
  kShuffleXor,
  kBallot,
  kAny,
  kAll,
  kSyncWarp,
};

// Blocks the calling thread until every lane of `mask` (its warp's lanes) has reached a collective
// of the same kind with the same mask, then returns this lane's result: the shuffled value's bytes,
// or the ballot / vote. Only the lanes of the mask wait: other warps, and other lanes, run on.
// A lane of the mask that has exited, a mask without the caller, collectives of different kinds
// meeting, or a shuffle reading a lane outside the mask end the launch with an error.
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int value_bytes, int arg, int width,
                         Site site);

// __syncthreads: waits until every thread of the block that has not exited is waiting at a block
// barrier (exited threads count as arrived). Threads waiting at different barriers (different
// source lines) end the launch with an error, as does a barrier that cannot complete.
void block_barrier(Site site);

// Called where a __shared__ variable is declared (the translation step inserts the call): the first
// thread of each block to get there fills the variable with the poison byte, so that reading shared
// memory no thread of this block wrote gives garbage, as on the GPU. Also counts the block's static
// shared memory against the 48 KiB limit.
void shared_declared(void* address, size_t bytes, unsigned long long* epoch, const char* name, Site site);

// Ends the launch with `message` (from kernel code, e.g. a failed check).
[[noreturn]] void fail(const char* message);

using KernelEntry = void (*)(const void* closure);

// Runs entry(closure) as every thread of every block of the grid. Returns the launch's CUDA error
// (an invalid configuration is reported as the GPU reports it, through cudaGetLastError); an
// emulator error (deadlock, misuse, fault) aborts the whole guarded call instead.
cudaError_t launch_grid(const char* kernel, Site site, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                        cudaStream_t stream, KernelEntry entry, const void* closure);

// The error of the last launch, as cudaGetLastError / cudaPeekAtLastError report it.
cudaError_t last_error(bool reset);
void set_last_error(cudaError_t error);

// Memory whose neighbourhood is protected: a PROT_NONE page before and after it (any access there
// faults, and the fault ends the guarded call with a message naming the buffer), and a canary in
// the rest of its pages that every guarded call checks afterwards. `at_end`: the buffer ends where
// the rear guard page begins (catches the smallest overrun); otherwise it starts right after the
// front guard page (catches the smallest underrun, and is page-aligned).
void* fenced_alloc(size_t bytes, bool at_end, const char* name);
void fenced_free(void* data);
unsigned char poison_byte();

}  // namespace fdemu

// The C interface (ctypes, tests/cuda_emulation/emulator.py).
extern "C" {
// lane_order: which runnable thread of a block runs next: 0 ascending, 1 descending, 2 random, 3 warps
// ahead (the warp that ran last goes on while it can); block_order: 0 ascending, 1 descending,
// 2 random; seed for the random orders;
// poison: the byte that fills fresh shared memory and the drivers' workspaces; timeout_s: a guarded
// call that runs longer ends with an error (0: no limit).
void fdemu_configure(int lane_order, int block_order, uint64_t seed, int poison, double timeout_s);
const char* fdemu_last_error();
// Counters since the last reset: [launches, blocks, thread switches, block barriers, warp collectives].
void fdemu_counters(uint64_t* out, int reset);
void* fdemu_fenced_alloc(uint64_t bytes, int at_end);
void fdemu_fenced_free(void* data);
}

namespace fdemu {
// Runs fn(arg) with faults, timeouts and emulator errors turned into a return value: 0, or -1 with
// fdemu_last_error() describing what happened. Every driver entry point goes through here.
int guarded_call(void (*fn)(void*), void* arg);
// A driver's own error (e.g. a launcher returned a CUDA error): ends the guarded call.
[[noreturn]] void driver_error(const char* message);
}  // namespace fdemu
