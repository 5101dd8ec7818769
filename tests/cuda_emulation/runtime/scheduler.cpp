// The CUDA-on-CPU emulator's scheduler: every CUDA thread of a block is a fiber with its own stack;
// blocks run one after another on the calling OS thread.
//
// A fiber runs until it reaches a barrier or a warp collective, or exits; the scheduler then picks
// the next runnable fiber (in lane order, reverse lane order, or at random). Warp collectives are
// warp-scoped: they complete as soon as every lane of their mask has arrived, whatever the other
// warps do, so warps may execute different numbers of shuffles, as on the GPU. __syncthreads
// completes when every thread that has not exited waits at it. When no fiber can run and the block
// is not finished, the launch ends with a deadlock report instead of hanging.
//
// Everything the emulator can detect (deadlock, collectives misused, memory faults in fenced
// buffers, fiber stack overflow, timeouts) ends the current guarded call with a message
// (fdemu_last_error) rather than aborting the process.
#include "fdemu/runtime.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
extern "C" void fdemu_fiber_main();
dim3 blockDim;
dim3 gridDim;

namespace fdemu {
namespace {

// ------------------------------------------------------------------------------------------------
// Context switching. On x86-64 a few instructions that save the callee-saved registers and swap
// stacks (swapcontext would also make a signal-mask system call on every switch); elsewhere ucontext.

#if defined(__x86_64__)
extern "C" void fdemu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .type fdemu_switch_stack, @function
fdemu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fdemu_switch_stack, .-fdemu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxStaticSharedBytes = 48 * 1024;

enum class FiberState { kRunnable, kWaitingWarp, kWaitingBlock, kDone };

struct Fiber {
  Context context;
  char* guard = nullptr;  // the PROT_NONE page below the stack
  char* stack = nullptr;  // kStackBytes above it
  uint3 thread{};
  int index = 0;
  int warp = 0;
  int lane = 0;
  FiberState state = FiberState::kDone;  // changed only through set_state
  int runnable_slot = -1;                // its place in g_runnable while runnable
  // The collective or barrier it waits at.
  Collective kind = Collective::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;
  int value_bytes = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
  Site site{};
};

struct Config {
  int lane_order = 0;
  int block_order = 0;
  uint64_t seed = 0;
  unsigned char poison = 0xff;
  double timeout_s = 300.0;
};

struct Counters {
  uint64_t launches = 0, blocks = 0, switches = 0, block_barriers = 0, warp_collectives = 0;
};

struct Launch {
  const char* kernel = nullptr;
  Site site{};
  dim3 grid, block;
  KernelEntry entry = nullptr;
  const void* closure = nullptr;
  int threads = 0;
  uint3 block_index{};
  Fiber* current = nullptr;
  size_t shared_bytes = 0;
};

// Per warp of the running block: lanes waiting at a warp collective, and lanes that have exited
// (or that the block does not have), so that an arrival checks its mask in O(1).
struct WarpLanes {
  unsigned waiting = 0;
  unsigned gone = 0;
};

Config g_config;
Counters g_counters;
std::vector<Fiber> g_fibers;  // the pool, reused by every block
WarpLanes g_warps[kMaxThreadsPerBlock / 32];
std::vector<int> g_runnable;  // the runnable threads of the block, in no order (for random picks)
Context g_scheduler;          // where fibers switch back to
Launch g_launch_state;  // global, so that a fault handler can still describe it after the jump
Launch* g_launch = nullptr;
unsigned long long g_block_epoch = 0;
std::mt19937_64 g_random;
cudaError_t g_last_cuda_error = cudaSuccess;
std::string g_error;  // the last guarded call's error
std::mutex g_call_mutex;

// Guarded-call state: where a fault, timeout or error returns to.
sigjmp_buf g_escape;
bool g_in_guarded_call = false;
volatile sig_atomic_t g_signal = 0;
void* volatile g_fault_address = nullptr;
std::string g_pending_error;  // set before escaping from an error (not from a signal handler)

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buffer[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kShuffleIndex:
      return "__shfl_sync";
    case Collective::kShuffleUp:
      return "__shfl_up_sync";
    case Collective::kShuffleDown:
      return "__shfl_down_sync";
    case Collective::kShuffleXor:
      return "__shfl_xor_sync";
    case Collective::kBallot:
      return "__ballot_sync";
    case Collective::kAny:
      return "__any_sync";
    case Collective::kAll:
      return "__all_sync";
    case Collective::kSyncWarp:
      return "__syncwarp";
  }
  return "?";
}

std::string describe_site(Site site) { return format("%s:%d", site.file ? site.file : "?", site.line); }

std::string describe_thread(const Fiber& f) {
  return format("thread (%u,%u,%u) (warp %d lane %d)", f.thread.x, f.thread.y, f.thread.z, f.warp, f.lane);
}

std::string describe_launch() {
  if (!g_launch) return "outside any kernel";
  const Launch& l = *g_launch;
  return format("kernel %s launched at %s, block (%u,%u,%u)", l.kernel, describe_site(l.site).c_str(),
                l.block_index.x, l.block_index.y, l.block_index.z);
}

// Ends the guarded call with `message`: from a fiber or from the scheduler, never returns.
[[noreturn]] void escape_with(const std::string& message) {
  g_pending_error = message;
  siglongjmp(g_escape, 1);
}

[[noreturn]] void launch_error(const std::string& message) {
  std::string where = describe_launch();
  if (g_launch && g_launch->current) where += ", " + describe_thread(*g_launch->current);
  escape_with(message + " [" + where + "]");
}

// ------------------------------------------------------------------------------------------------
// Fibers

void set_state(Fiber& f, FiberState state) {
  const bool was = f.state == FiberState::kRunnable, is = state == FiberState::kRunnable;
  f.state = state;
  if (was == is) return;
  if (is) {
    f.runnable_slot = static_cast<int>(g_runnable.size());
    g_runnable.push_back(f.index);
  } else {
    const int moved = g_runnable.back();
    g_runnable[f.runnable_slot] = moved;
    g_fibers[moved].runnable_slot = f.runnable_slot;
    g_runnable.pop_back();
    f.runnable_slot = -1;
  }
}

void allocate_fibers(int count) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(g_fibers.size()) < count) {
    g_fibers.emplace_back();
    Fiber& f = g_fibers.back();
    void* memory = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) escape_with("cannot allocate fiber stacks");
    f.guard = static_cast<char*>(memory);
    mprotect(f.guard, page, PROT_NONE);
    f.stack = f.guard + page;
  }
}

void prepare_fiber(Fiber& f) {
#if defined(__x86_64__)
  // The stack as fdemu_switch_stack leaves it: six saved registers, then the address it returns
  // to (the fiber's entry), above which a fake return address keeps the ABI's 16-byte alignment.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fdemu_fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.context.sp = sp;
#else
  getcontext(&f.context.uc);
  f.context.uc.uc_stack.ss_sp = f.stack;
  f.context.uc.uc_stack.ss_size = kStackBytes;
  f.context.uc.uc_link = nullptr;
  makecontext(&f.context.uc, fdemu_fiber_main, 0);
#endif
}

// From the scheduler to fiber `f`; returns when a fiber hands back to the scheduler.
void switch_to_fiber(Fiber& f) {
  ++g_counters.switches;
  g_launch->current = &f;
  threadIdx = f.thread;
#if defined(__x86_64__)
  fdemu_switch_stack(&g_scheduler.sp, f.context.sp);
#else
  swapcontext(&g_scheduler.uc, &f.context.uc);
#endif
  g_launch->current = nullptr;
}

// From fiber `from` straight to fiber `to` (no detour through the scheduler); returns when some
// fiber switches back to `from`.
void switch_between(Fiber& from, Fiber& to) {
  ++g_counters.switches;
  g_launch->current = &to;
  threadIdx = to.thread;
#if defined(__x86_64__)
  fdemu_switch_stack(&from.context.sp, to.context.sp);
#else
  swapcontext(&from.context.uc, &to.context.uc);
#endif
}

void switch_to_scheduler(Fiber& f) {
#if defined(__x86_64__)
  fdemu_switch_stack(&f.context.sp, g_scheduler.sp);
#else
  swapcontext(&f.context.uc, &g_scheduler.uc);
#endif
}

Fiber& current_fiber(const char* what) {
  if (!g_launch || !g_launch->current) escape_with(format("%s called outside a kernel", what));
  return *g_launch->current;
}

Fiber* lane_fiber(const Fiber& f, int lane) {
  const int index = f.warp * warpSize + lane;
  return index < g_launch->threads ? &g_fibers[index] : nullptr;
}

std::string mask_lanes(unsigned mask) { return format("0x%08x", mask); }

// ------------------------------------------------------------------------------------------------
// Warp collectives

// The lane whose value `f`'s shuffle returns, or -1 for its own value.
int shuffle_source(const Fiber& f) {
  const int width = f.width;
  const int segment = f.lane & ~(width - 1);
  switch (f.kind) {
    case Collective::kShuffleIndex:
      return segment + (f.arg & (width - 1));
    case Collective::kShuffleUp:
      return f.lane - f.arg >= segment ? f.lane - f.arg : -1;
    case Collective::kShuffleDown:
      return f.lane + f.arg < segment + width ? f.lane + f.arg : -1;
    case Collective::kShuffleXor: {
      const int source = f.lane ^ f.arg;
      return source < segment + width ? source : -1;
    }
    default:
      return -1;
  }
}

bool is_shuffle(Collective kind) {
  return kind == Collective::kShuffleIndex || kind == Collective::kShuffleUp || kind == Collective::kShuffleDown ||
         kind == Collective::kShuffleXor;
}

// Every lane of `f`'s mask is waiting at the same collective: compute each lane's result.
void complete_collective(Fiber& f) {
  const unsigned mask = f.mask;
  unsigned votes = 0;
  for (int lane = 0; lane < warpSize; ++lane) {
    if ((mask >> lane & 1u) && lane_fiber(f, lane)->value != 0) votes |= 1u << lane;
  }
  for (int lane = 0; lane < warpSize; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    Fiber& g = *lane_fiber(f, lane);
    switch (f.kind) {
      case Collective::kBallot:
        g.result = votes;
        break;
      case Collective::kAny:
        g.result = votes != 0;
        break;
      case Collective::kAll:
        g.result = votes == mask;
        break;
      case Collective::kSyncWarp:
        g.result = 0;
        break;
      default: {
        const int source = shuffle_source(g);
        if (source < 0 || source >= warpSize) {
          g.result = g.value;
        } else if (!(mask >> source & 1u)) {
          g_launch->current = &g;
          launch_error(format("%s at %s reads lane %d, which is not in its mask %s (undefined on the GPU)",
                              collective_name(g.kind), describe_site(g.site).c_str(), source,
                              mask_lanes(mask).c_str()));
        } else {
          g.result = lane_fiber(f, source)->value;
        }
      }
    }
  }
  for (int lane = 0; lane < warpSize; ++lane) {
    if (mask >> lane & 1u) set_state(*lane_fiber(f, lane), FiberState::kRunnable);
  }
  g_warps[f.warp].waiting &= ~mask;
}

// After `f` arrived: complete the collective if every lane of its mask is there.
void try_complete_collective(Fiber& f) {
  const WarpLanes& warp = g_warps[f.warp];
  if (f.mask & warp.gone) {
    const int lane = __builtin_ctz(f.mask & warp.gone);
    if (lane_fiber(f, lane) == nullptr) {
      launch_error(format("%s at %s: its mask %s names lane %d, which this block (%d threads) does not have",
                          collective_name(f.kind), describe_site(f.site).c_str(), mask_lanes(f.mask).c_str(), lane,
                          g_launch->threads));
    }
    launch_error(format("%s at %s: lane %d of its mask %s has exited and can never arrive", collective_name(f.kind),
                        describe_site(f.site).c_str(), lane, mask_lanes(f.mask).c_str()));
  }
  if ((warp.waiting & f.mask) != f.mask) return;  // not everyone there yet
  for (int lane = 0; lane < warpSize; ++lane) {
    if (!(f.mask >> lane & 1u)) continue;
    const Fiber* g = lane_fiber(f, lane);
    if (g->mask != f.mask) return;  // waiting at another collective, which may complete first
    if (g->kind != f.kind || (is_shuffle(f.kind) && (g->width != f.width || g->value_bytes != f.value_bytes))) {
      launch_error(format("lanes of mask %s meet at different warp collectives: lane %d at %s (%s, width %d, "
                          "%d bytes), lane %d at %s (%s, width %d, %d bytes)",
                          mask_lanes(f.mask).c_str(), g->lane, collective_name(g->kind), describe_site(g->site).c_str(),
                          g->width, g->value_bytes, f.lane, collective_name(f.kind), describe_site(f.site).c_str(),
                          f.width, f.value_bytes));
    }
  }
  complete_collective(f);
}

// A lane exits: a collective of its warp that names it can never complete.
void check_exit(Fiber& f) {
  g_warps[f.warp].gone |= 1u << f.lane;
  for (int lane = 0; lane < warpSize; ++lane) {
    const Fiber* g = lane_fiber(f, lane);
    if (g && g->state == FiberState::kWaitingWarp && (g->mask >> f.lane & 1u)) {
      launch_error(format("exited while lane %d waits for it in %s at %s (mask %s)", g->lane,
                          collective_name(g->kind), describe_site(g->site).c_str(), mask_lanes(g->mask).c_str()));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Blocks

// Why no fiber can run: the waits of every live thread, grouped by what they wait at.
std::string describe_deadlock() {
  std::string text = "deadlock: no thread can run and the block has not finished.";
  int shown = 0;
  for (int i = 0; i < g_launch->threads && shown < 12; ++i) {
    const Fiber& f = g_fibers[i];
    if (f.state == FiberState::kDone) continue;
    // One line per run of consecutive threads waiting at the same place.
    int last = i;
    while (last + 1 < g_launch->threads) {
      const Fiber& n = g_fibers[last + 1];
      if (n.state != f.state || n.site.line != f.site.line || n.site.file != f.site.file || n.kind != f.kind ||
          n.mask != f.mask)
        break;
      ++last;
    }
    if (f.state == FiberState::kWaitingBlock) {
      text += format(" threads %d-%d wait in __syncthreads at %s;", i, last, describe_site(f.site).c_str());
    } else {
      text += format(" threads %d-%d wait in %s at %s (mask %s);", i, last, collective_name(f.kind),
                     describe_site(f.site).c_str(), mask_lanes(f.mask).c_str());
    }
    i = last;
    ++shown;
  }
  int exited = 0;
  for (int i = 0; i < g_launch->threads; ++i) exited += g_fibers[i].state == FiberState::kDone;
  return text + format(" %d threads have exited.", exited);
}

// No fiber is runnable: release a complete block barrier, finish the block, or report a deadlock.
// Returns false when the block is finished.
bool resolve_waits() {
  const Fiber* first_waiting = nullptr;
  for (int i = 0; i < g_launch->threads; ++i) {
    const Fiber& f = g_fibers[i];
    if (f.state == FiberState::kDone) continue;
    if (f.state != FiberState::kWaitingBlock) launch_error(describe_deadlock());
    if (first_waiting == nullptr) first_waiting = &f;
  }
  if (first_waiting == nullptr) return false;  // every thread has exited
  for (int i = 0; i < g_launch->threads; ++i) {
    const Fiber& f = g_fibers[i];
    if (f.state == FiberState::kWaitingBlock &&
        (f.site.line != first_waiting->site.line || std::strcmp(f.site.file, first_waiting->site.file) != 0)) {
      launch_error(format("threads wait at different __syncthreads: thread %d at %s, thread %d at %s (a barrier "
                          "in divergent code)",
                          first_waiting->index, describe_site(first_waiting->site).c_str(), f.index,
                          describe_site(f.site).c_str()));
    }
  }
  ++g_counters.block_barriers;
  for (int i = 0; i < g_launch->threads; ++i) {
    if (g_fibers[i].state == FiberState::kWaitingBlock) set_state(g_fibers[i], FiberState::kRunnable);
  }
  return true;
}

// The next fiber to run in the block's lane order, or nullptr if none is runnable.
int g_cursor = 0;

Fiber* next_runnable() {
  const int n = g_launch->threads;
  if (g_config.lane_order == 2) {
    return g_runnable.empty() ? nullptr : &g_fibers[g_runnable[g_random() % g_runnable.size()]];
  }
  if (g_config.lane_order == 3) {
    // Warps ahead: keep running the warp that ran last while any of its lanes can, then the next
    // warp: one warp gets as far ahead of the others as the barriers allow (what a GPU may do when
    // a warp is scheduled eagerly), which exposes shared memory reused before every warp read it.
    const int warps = (n + warpSize - 1) / warpSize;
    for (int step = 0; step < warps; ++step) {
      const int w = (g_cursor + step) % warps;
      for (int i = w * warpSize; i < std::min(n, (w + 1) * warpSize); ++i) {
        if (g_fibers[i].state == FiberState::kRunnable) {
          g_cursor = w;
          return &g_fibers[i];
        }
      }
    }
    return nullptr;
  }
  const bool descending = g_config.lane_order == 1;
  for (int step = 0; step < n; ++step) {
    const int i = descending ? n - 1 - g_cursor : g_cursor;
    if (++g_cursor == n) g_cursor = 0;
    if (g_fibers[i].state == FiberState::kRunnable) return &g_fibers[i];
  }
  return nullptr;
}

// A fiber that waits (or exits) hands over to the next runnable fiber, or to the scheduler when
// there is none (the scheduler then releases a barrier, finishes the block or reports a deadlock).
void hand_over(Fiber& f) {
  Fiber* next = next_runnable();
  if (next == &f) return;  // random order picked the same (runnable) fiber
  if (next != nullptr) {
    switch_between(f, *next);
  } else {
    switch_to_scheduler(f);
  }
}

void run_block(uint3 index) {
  Launch& l = *g_launch;
  ++g_counters.blocks;
  l.block_index = index;
  blockIdx = index;
  l.shared_bytes = 0;
  ++g_block_epoch;
  g_runnable.clear();
  for (int w = 0; w * warpSize < l.threads; ++w) {
    const int lanes = std::min(warpSize, l.threads - w * warpSize);
    g_warps[w].waiting = 0;
    g_warps[w].gone = lanes == warpSize ? 0u : ~((1u << lanes) - 1u);
  }
  for (int i = 0; i < l.threads; ++i) {
    Fiber& f = g_fibers[i];
    f.index = i;
    f.thread = uint3{static_cast<unsigned>(i) % l.block.x, static_cast<unsigned>(i) / l.block.x % l.block.y,
                     static_cast<unsigned>(i) / (l.block.x * l.block.y)};
    f.warp = i / warpSize;
    f.lane = i % warpSize;
    f.state = FiberState::kDone;
    f.runnable_slot = -1;
    set_state(f, FiberState::kRunnable);
    prepare_fiber(f);
  }
  g_cursor = 0;
  for (;;) {
    Fiber* f = next_runnable();
    if (f == nullptr) {
      if (!resolve_waits()) return;
      g_cursor = 0;
      continue;
    }
    switch_to_fiber(*f);
  }
}

}  // namespace

extern "C" void fdemu_fiber_main() {
  Fiber& f = *g_launch->current;
  g_launch->entry(g_launch->closure);
  set_state(f, FiberState::kDone);
  check_exit(f);
  hand_over(f);
  __builtin_unreachable();
}

// ------------------------------------------------------------------------------------------------
// The interface of fdemu/runtime.h

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int value_bytes, int arg, int width,
                         Site site) {
  Fiber& f = current_fiber(collective_name(kind));
  ++g_counters.warp_collectives;
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.value_bytes = value_bytes;
  f.arg = arg;
  f.width = width;
  f.site = site;
  if (!(mask >> f.lane & 1u)) {
    launch_error(format("%s at %s with mask %s, which does not include the calling lane %d", collective_name(kind),
                        describe_site(site).c_str(), mask_lanes(mask).c_str(), f.lane));
  }
  if (is_shuffle(kind) && (width < 1 || width > warpSize || (width & (width - 1)) != 0)) {
    launch_error(format("%s at %s with width %d (must be a power of 2 up to 32)", collective_name(kind),
                        describe_site(site).c_str(), width));
  }
  set_state(f, FiberState::kWaitingWarp);
  g_warps[f.warp].waiting |= 1u << f.lane;
  try_complete_collective(f);
  // The last lane to arrive goes on at once, except in random order, where the scheduler picks.
  if (f.state != FiberState::kRunnable || g_config.lane_order == 2) hand_over(f);
  return f.result;
}

void block_barrier(Site site) {
  Fiber& f = current_fiber("__syncthreads");
  f.site = site;
  set_state(f, FiberState::kWaitingBlock);
  hand_over(f);
}

void shared_declared(void* address, size_t bytes, unsigned long long* epoch, const char* name, Site site) {
  current_fiber("a __shared__ declaration");
  if (*epoch == g_block_epoch) return;
  *epoch = g_block_epoch;
  std::memset(address, g_config.poison, bytes);
  g_launch->shared_bytes += bytes;
  if (g_launch->shared_bytes > kMaxStaticSharedBytes) {
    launch_error(format("static shared memory of the block reaches %zu bytes with %s (%zu bytes, at %s): above "
                        "the 48 KiB limit",
                        g_launch->shared_bytes, name, bytes, describe_site(site).c_str()));
  }
}

void fail(const char* message) { launch_error(message); }

cudaError_t launch_grid(const char* kernel, Site site, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                        cudaStream_t, KernelEntry entry, const void* closure) {
  if (!g_in_guarded_call) escape_with("kernel launched outside fdemu::guarded_call");
  if (g_launch) launch_error(format("kernel %s launched from inside a kernel", kernel));
  ++g_counters.launches;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g_last_cuda_error = cudaErrorInvalidConfiguration;
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_shared_bytes != 0) {
    escape_with(format("kernel %s at %s: dynamic shared memory is not emulated", kernel, describe_site(site).c_str()));
  }
  g_launch_state = Launch{};
  Launch& l = g_launch_state;
  l.kernel = kernel;
  l.site = site;
  l.grid = grid;
  l.block = block;
  l.entry = entry;
  l.closure = closure;
  l.threads = static_cast<int>(threads);
  allocate_fibers(l.threads);
  g_launch = &l;
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  // Block order: ascending, descending, or a seeded random permutation (drawn lazily in chunks, so
  // that huge grids need no huge permutation).
  std::vector<uint64_t> order;
  if (g_config.block_order == 2) {
    order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), g_random);
  }
  for (uint64_t step = 0; step < blocks; ++step) {
    const uint64_t b = g_config.block_order == 0 ? step : g_config.block_order == 1 ? blocks - 1 - step : order[step];
    run_block(uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))});
  }
  g_launch = nullptr;
  return cudaSuccess;
}

cudaError_t last_error(bool reset) {
  const cudaError_t error = g_last_cuda_error;
  if (reset) g_last_cuda_error = cudaSuccess;
  return error;
}

void set_last_error(cudaError_t error) { g_last_cuda_error = error; }

unsigned char poison_byte() { return g_config.poison; }

// ------------------------------------------------------------------------------------------------
// Fenced memory

namespace {

constexpr unsigned char kCanary = 0xa5;

struct Fenced {
  char* base;        // the front guard page
  size_t mapped;     // everything mapped, both guards included
  char* data;
  size_t bytes;
  int id;
};

std::vector<Fenced> g_fenced;
int g_next_fenced_id = 0;

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// The usable pages of a fenced buffer (between the guards).
char* usable_begin(const Fenced& f) { return f.base + page_size(); }
char* usable_end(const Fenced& f) { return f.base + f.mapped - page_size(); }

std::string check_canaries() {
  for (const Fenced& f : g_fenced) {
    for (char* p = usable_begin(f); p < usable_end(f); ++p) {
      if (p >= f.data && p < f.data + f.bytes) {
        p = f.data + f.bytes - 1;
        continue;
      }
      if (static_cast<unsigned char>(*p) != kCanary) {
        const long offset = p < f.data ? -static_cast<long>(f.data - p) : static_cast<long>(p - (f.data + f.bytes));
        return format("out-of-bounds write: byte %s %ld of fenced buffer #%d (%zu bytes) was overwritten",
                      p < f.data ? "before the start, at offset" : "after the end, at offset", offset, f.id, f.bytes);
      }
    }
  }
  return "";
}

std::string describe_fault(void* address) {
  const char* a = static_cast<const char*>(address);
  const size_t page = page_size();
  for (const Fenced& f : g_fenced) {
    if (a >= f.base && a < f.base + page) {
      return format("out-of-bounds access %ld bytes before fenced buffer #%d (%zu bytes)", static_cast<long>(f.data - a),
                    f.id, f.bytes);
    }
    if (a >= usable_end(f) && a < f.base + f.mapped) {
      return format("out-of-bounds access %ld bytes after the end of fenced buffer #%d (%zu bytes)",
                    static_cast<long>(a - (f.data + f.bytes)), f.id, f.bytes);
    }
  }
  for (const Fiber& f : g_fibers) {
    if (a >= f.guard && a < f.guard + page) return format("stack overflow of thread %d's fiber", f.index);
  }
  return format("memory fault at address %p (outside every fenced buffer)", address);
}

}  // namespace

void* fenced_alloc(size_t bytes, bool at_end, const char*) {
  const size_t page = page_size();
  const size_t usable = std::max<size_t>(page, (bytes + page - 1) / page * page);
  const size_t mapped = usable + 2 * page;
  void* memory = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(memory);
  mprotect(base, page, PROT_NONE);
  mprotect(base + page + usable, page, PROT_NONE);
  std::memset(base + page, kCanary, usable);
  char* data = at_end ? base + page + usable - bytes : base + page;
  g_fenced.push_back(Fenced{base, mapped, data, bytes, g_next_fenced_id++});
  return data;
}

void fenced_free(void* data) {
  for (size_t i = 0; i < g_fenced.size(); ++i) {
    if (g_fenced[i].data == data) {
      munmap(g_fenced[i].base, g_fenced[i].mapped);
      g_fenced.erase(g_fenced.begin() + static_cast<long>(i));
      return;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Guarded calls

namespace {

void on_signal(int signal, siginfo_t* info, void*) {
  if (!g_in_guarded_call) {
    // Not ours: let the default action happen on return.
    ::signal(signal, SIG_DFL);
    return;
  }
  g_signal = signal;
  g_fault_address = info ? info->si_addr : nullptr;
  siglongjmp(g_escape, 2);
}

struct SignalScope {
  struct sigaction old_segv, old_bus, old_ill, old_alarm;
  stack_t old_stack;
  std::vector<char> alternate;

  explicit SignalScope(double timeout_s) : alternate(1 << 16) {
    stack_t stack{};
    stack.ss_sp = alternate.data();
    stack.ss_size = alternate.size();
    sigaltstack(&stack, &old_stack);
    struct sigaction action {};
    action.sa_sigaction = on_signal;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
    sigaction(SIGILL, &action, &old_ill);
    sigaction(SIGALRM, &action, &old_alarm);
    if (timeout_s > 0) {
      itimerval timer{};
      timer.it_value.tv_sec = static_cast<long>(timeout_s);
      timer.it_value.tv_usec = static_cast<long>((timeout_s - static_cast<double>(timer.it_value.tv_sec)) * 1e6);
      setitimer(ITIMER_REAL, &timer, nullptr);
    }
  }
  ~SignalScope() {
    itimerval off{};
    setitimer(ITIMER_REAL, &off, nullptr);
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaction(SIGILL, &old_ill, nullptr);
    sigaction(SIGALRM, &old_alarm, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

}  // namespace

int guarded_call(void (*fn)(void*), void* arg) {
  std::lock_guard<std::mutex> lock(g_call_mutex);
  g_error.clear();
  g_pending_error.clear();
  g_signal = 0;
  g_last_cuda_error = cudaSuccess;
  int rc = 0;
  {
    SignalScope scope(g_config.timeout_s);
    g_in_guarded_call = true;
    const int jumped = sigsetjmp(g_escape, 1);
    if (jumped == 0) {
      fn(arg);
    } else if (jumped == 2) {
      if (g_signal == SIGALRM) {
        g_error = format("timeout: the call ran longer than %g s (a kernel that never finishes?)", g_config.timeout_s);
      } else if (g_signal == SIGILL) {
        g_error = "undefined behaviour trapped (-fsanitize=alignment: a misaligned access, which the GPU faults on)";
        if (g_launch && g_launch->current) g_error += " in " + describe_thread(*g_launch->current);
      } else {
        g_error = describe_fault(g_fault_address);
        if (g_launch && g_launch->current) g_error += " in " + describe_thread(*g_launch->current);
      }
      g_error += " [" + describe_launch() + "]";
      rc = -1;
    } else {
      g_error = g_pending_error;
      rc = -1;
    }
    g_in_guarded_call = false;
  }
  g_launch = nullptr;
  if (rc == 0) {
    g_error = check_canaries();
    if (!g_error.empty()) rc = -1;
  }
  return rc;
}

void driver_error(const char* message) { escape_with(message); }

}  // namespace fdemu

extern "C" {

void fdemu_configure(int lane_order, int block_order, uint64_t seed, int poison, double timeout_s) {
  fdemu::g_config.lane_order = lane_order;
  fdemu::g_config.block_order = block_order;
  fdemu::g_config.seed = seed;
  fdemu::g_config.poison = static_cast<unsigned char>(poison);
  fdemu::g_config.timeout_s = timeout_s;
  fdemu::g_random.seed(seed);
}

const char* fdemu_last_error() { return fdemu::g_error.c_str(); }

void fdemu_counters(uint64_t* out, int reset) {
  const fdemu::Counters& c = fdemu::g_counters;
  out[0] = c.launches;
  out[1] = c.blocks;
  out[2] = c.switches;
  out[3] = c.block_barriers;
  out[4] = c.warp_collectives;
  if (reset) fdemu::g_counters = fdemu::Counters{};
}

void* fdemu_fenced_alloc(uint64_t bytes, int at_end) { return fdemu::fenced_alloc(bytes, at_end != 0, "python"); }

void fdemu_fenced_free(void* data) { fdemu::fenced_free(data); }

}  // extern "C"
