// fusedecode: the walk of one draft tree (its rules: docs/semantics.md#verify_tree), shared by the
// CPU and CUDA backends.
//
// `walk_tree` holds the control logic (which child is accepted, SpecInfer's residual updates, what is
// emitted); a backend supplies a `Row` with the data-parallel pieces for one batch row:
//
//   bool    valid(node)                     the node's row had no NaN/+inf and a finite entry
//   int64_t vocab_size()                    V
//   int64_t argmax(node)                    from the statistics pass
//   int64_t token(node)                     draft token of a node (-1: padding)
//   int64_t child_with_token(node, token)   first child c > node of `node` drafting `token`, or -1
//   int64_t next_child(node, after)         first child of `node` with index > after, or -1
//   float   prob(node, token)               p_node(token) = softmax(z_node)[token]
//   float   draft_prob(node, token)         q_node(token)
//   float   residual_mass(node, c)          sum over tokens of max(p - c q, 0)
//   int64_t sample(node, c, mass, u)        inverse-CDF draw from max(p - c q, 0) / mass (c = 0: p)
//
// On the GPU every thread of the CTA runs walk_tree in lockstep (the Row's methods are collective and
// return the same value everywhere); only `writer` stores the results.
//
// SpecInfer in closed form: after j rejections at a node, p'_j = max(p - c_j q, 0) / mass_j with
// c_0 = 0, mass_0 = 1, c_{j+1} = c_j + mass_j and mass_{j+1} = sum max(p - c_{j+1} q, 0); this is
// exactly repeated normalize(max(p' - q, 0)), and an update whose residual has no mass is skipped.
//
// Invalid input (validate=False) stays memory-safe: a child always has a larger index than its
// parent (children are searched after `node`), so a node whose parent is out of range or not
// before it is unreachable and every walk ends within N steps; a draft token outside [0, V) is
// never accepted and never used as an index (it is skipped like padding); `width` bounds the writes.
#pragma once

#include <cstdint>

#include "fusedecode/philox.h"
#include "fusedecode/stats_state.h"
#include "fusedecode/vocab_slices.h"

namespace fusedecode {

enum VerifyMode : int { kVerifyGreedy = 0, kVerifySample = 1, kVerifyMultiDraft = 2 };

// Which walk verify_tree runs: greedy at temperature 0 (draft probabilities are then ignored),
// SpecInfer when draft probabilities are given, else target-only sampling.
inline int verify_mode_of(double temperature, bool has_draft_probs) {
  if (temperature == 0) return kVerifyGreedy;
  return has_draft_probs ? kVerifyMultiDraft : kVerifySample;
}

// The temperature of verify_tree's statistics pass and of its sampling: 1 when greedy.
inline float verify_statistics_temperature(double temperature) {
  return temperature > 0 ? static_cast<float>(temperature) : 1.f;
}

// Writes accepted_nodes[0..count], output_tokens[0..count] and *num_accepted (when `writer`); `width`
// (D + 1) bounds the depth, so a wrong depth can end a walk early but never write out of bounds.
template <class Row>
FD_HOST_DEVICE void walk_tree(Row& row, int mode, uint64_t seed, uint64_t batch_row, bool writer, int64_t width,
                              int64_t* accepted_nodes, int64_t* output_tokens, int64_t* num_accepted) {
  int64_t node = 0;
  int64_t count = 0;
  if (writer) accepted_nodes[0] = 0;
  while (row.valid(node)) {
    int64_t child = -1;
    int64_t choice = -1;
    if (mode == kVerifyGreedy) {
      choice = row.argmax(node);
      child = row.child_with_token(node, choice);
    } else if (mode == kVerifySample) {
      choice = row.sample(node, 0.f, 1.f, philox_uniform(seed, batch_row, node, kSampleDraw));
      child = row.child_with_token(node, choice);
    } else {
      float c = 0.f;
      float mass = 1.f;
      for (int64_t candidate = row.next_child(node, node); candidate >= 0;
           candidate = row.next_child(node, candidate)) {
        const int64_t token = row.token(candidate);
        if (token < 0 || token >= row.vocab_size()) continue;  // padding (or out of range: never read)
        const float q = row.draft_prob(node, token);
        if (!(q > 0.f && q < FD_INFINITY)) continue;  // could not have been drawn from q
        const float p = row.prob(node, token);
        const float excess = p - c * q;
        const float ratio = (excess > 0.f ? excess : 0.f) / mass / q;
        if (philox_uniform(seed, batch_row, candidate, kAcceptDraw) < ratio) {
          child = candidate;
          break;
        }
        const float next_c = c + mass;
        const float next_mass = row.residual_mass(node, next_c);
        if (next_mass > 0.f) {
          c = next_c;
          mass = next_mass;
        }
      }
      if (child < 0) choice = row.sample(node, c, mass, philox_uniform(seed, batch_row, node, kSampleDraw));
    }
    if (child < 0 || count + 1 >= width) {
      if (writer && child < 0) output_tokens[count] = choice;
      break;
    }
    if (writer) {
      output_tokens[count] = row.token(child);
      accepted_nodes[count + 1] = child;
    }
    ++count;
    node = child;
  }
  if (writer) *num_accepted = count;
}

}  // namespace fusedecode
