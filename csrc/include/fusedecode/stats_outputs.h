// fusedecode: the one C++ list of logit_stats' outputs, and the one C++ top-k limit.
//
// Framework-free, like stats_state.h. Everything on the C++ side that names the outputs one by one
// expands FUSEDECODE_LOGIT_STATS_OUTPUTS instead: StatsFields, StatsOutputPointers and the stores of
// store_row_stats (stats_state.h); LogitStatsOutputs, its allocation, returns() and pointers()
// (csrc/logit_stats_op.h); the statistics verify_tree returns (csrc/verify_tree_op.h); the return
// lists of both schemas (csrc/ops.cpp); in the tests, the call structs of the CUDA emulation's
// drivers and the output of tests/support/cuda_host_sim.cpp (tests/cuda_emulation/emulator.py reads
// the X(...) lines below: one entry per line), and finalize_state's invalid row (NaN, -1 for an
// index). A new output is one line here plus its math (finalize_state or store_row_stats, and the
// kernels when it needs new sums).
#pragma once

#include <cstdint>

namespace fusedecode {

// Which calls compute an output: all of them, or those given token ids / a topk > 0. The names are
// the `requested_by` values of the Python table.
enum class RequestedBy { always, token_ids, topk };

// X(name, element type, requested_by), in the schema's order: the order of OUTPUTS in
// python/fusedecode/ops/logit_stats/contract.py. tests/ops/test_registry.py compares the registered schemas,
// which are built from this list, with the Python table, so neither side can change alone.
#define FUSEDECODE_LOGIT_STATS_OUTPUTS(X) \
  X(logsumexp, float, always)             \
  X(entropy, float, always)               \
  X(varentropy, float, always)            \
  X(self_certainty, float, always)        \
  X(max_logprob, float, always)           \
  X(argmax, int64_t, always)              \
  X(token_logprob, float, token_ids)      \
  X(topk_confidence, float, topk)

// FUSEDECODE_IF_ALWAYS(requested_by, code...) expands to the code for an output every call computes
// and to nothing for the others (verify_tree returns exactly the former). One line per RequestedBy.
#define FUSEDECODE_IF_ALWAYS(requested_by, ...) FUSEDECODE_IF_ALWAYS_##requested_by(__VA_ARGS__)
#define FUSEDECODE_IF_ALWAYS_always(...) __VA_ARGS__
#define FUSEDECODE_IF_ALWAYS_token_ids(...)
#define FUSEDECODE_IF_ALWAYS_topk(...)

constexpr bool is_requested(RequestedBy requested_by, bool with_token_ids, bool with_topk) {
  return requested_by == RequestedBy::always || (requested_by == RequestedBy::token_ids && with_token_ids) ||
         (requested_by == RequestedBy::topk && with_topk);
}

// The largest topk logit_stats accepts, on every backend: MAX_TOPK in python/fusedecode/ops/logit_stats/contract.py
// (tests/test_op_contract.py checks the two are equal through fusedecode._C.build_info()). The CPU
// kernel keeps this many candidates per slice; the CUDA kernel's per-warp list (two per lane) must
// hold as many (a static_assert in logit_stats.cuh).
constexpr int kMaxTopK = 64;

}  // namespace fusedecode
