// cpp backend of verify_tree: the statistics pass over every node's row (kVerifySliceTokens-token
// slices, vocab_slices.h, kept for sampling), then one tree walk per batch row (tree_walk.h),
// parallel over the batch.
#include "fusedecode/tree_walk.h"
#include "slice_reduce.h"
#include "verify_tree_op.h"

#include <cmath>

namespace fusedecode {
namespace cpu {
namespace {

template <typename scalar_t, typename prob_t>
struct CpuTreeRow {
  const scalar_t* logits;  // node 0 of this batch row
  int64_t node_stride;
  int64_t vocab;
  float inv_t;
  const float* max_logprob;  // [N]: -log sum exp(z - max z)
  const int64_t* argmaxes;   // [N]
  const SliceResult* slices; // [N * splits]: the statistics pass's slices of each node row
  VocabSlices cut;            // how those slices cut a row
  int64_t splits;
  const prob_t* q;           // node 0 of this batch row, or nullptr
  int64_t q_node_stride;
  const int64_t* parents;    // [N]
  const int64_t* tokens;     // [N]
  int64_t nodes;

  float x(int64_t node, int64_t i) const { return static_cast<float>(logits[node * node_stride + i]); }
  bool valid(int64_t node) const { return argmaxes[node] >= 0; }
  int64_t vocab_size() const { return vocab; }
  int64_t argmax(int64_t node) const { return argmaxes[node]; }
  int64_t token(int64_t node) const { return tokens[node]; }

  int64_t child_with_token(int64_t node, int64_t wanted) const {
    for (int64_t c = node + 1; c < nodes; ++c) {
      if (parents[c] == node && tokens[c] == wanted) return c;
    }
    return -1;
  }
  int64_t next_child(int64_t node, int64_t after) const {
    for (int64_t c = after + 1; c < nodes; ++c) {
      if (parents[c] == node) return c;
    }
    return -1;
  }
  // p_node(t) relative to the row max (never z_t - logsumexp, a difference of two large numbers);
  // the row's max and log-probability are read once per pass over the vocabulary.
  struct NodeProb {
    float max_x;
    float max_logprob;
  };
  NodeProb node_prob(int64_t node) const { return {x(node, argmaxes[node]), max_logprob[node]}; }
  float prob_of(const NodeProb& np, float value) const {
    return std::exp(scaled_gap(value, np.max_x, inv_t) + np.max_logprob);
  }
  float prob(int64_t node, int64_t t) const { return prob_of(node_prob(node), x(node, t)); }
  float draft_prob(int64_t node, int64_t t) const { return static_cast<float>(q[node * q_node_stride + t]); }

  float excess(const NodeProb& np, int64_t node, int64_t i, float c) const {
    const float e = prob_of(np, x(node, i)) - c * draft_prob(node, i);
    return e > 0.f ? e : 0.f;
  }
  float residual_mass(int64_t node, float c) const {
    const NodeProb np = node_prob(node);
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) total += excess(np, node, i, c);
    return static_cast<float>(total);
  }

  int64_t sample(int64_t node, float c, float mass, float u) const {
    if (c != 0.f) {
      const NodeProb np = node_prob(node);
      const double target = static_cast<double>(u) * mass;
      double running = 0.0;
      int64_t last = -1;
      for (int64_t i = 0; i < vocab; ++i) {
        const float e = excess(np, node, i, c);
        if (e > 0.f) {
          running += e;
          last = i;
          if (running >= target) return i;
        }
      }
      return last >= 0 ? last : argmaxes[node];
    }
    // Inverse CDF over the slices of the statistics pass, then over the tokens of one slice.
    const SliceResult* own = slices + node * splits;
    float max_x = -kInf;
    for (int64_t s = 0; s < splits; ++s) {
      if (own[s].state.count > 0) max_x = std::max(max_x, own[s].state.max_x);
    }
    auto slice_mass = [&](int64_t s) {
      return static_cast<double>(own[s].state.sum_exp) * std::exp(merge_shift(own[s].state.max_x, max_x, inv_t));
    };
    double total = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      if (own[s].state.count > 0) total += slice_mass(s);
    }
    double remaining = static_cast<double>(u) * total;
    int64_t chosen = -1;
    for (int64_t s = 0; s < splits; ++s) {
      if (own[s].state.count == 0) continue;
      const double mass = slice_mass(s);
      chosen = s;  // the last slice with mass if rounding leaves `remaining` above the total
      if (remaining <= mass) break;
      remaining -= mass;
    }
    const int64_t begin = cut.begin(chosen);
    const int64_t end = cut.end(chosen);
    double running = 0.0;
    int64_t last = -1;
    for (int64_t i = begin; i < end; ++i) {
      const float value = x(node, i);
      if (value == -kInf) continue;
      const float weight = std::exp((value - max_x) * inv_t);  // -inf (0) where the gap overflows
      if (weight > 0.f) {
        running += weight;
        last = i;
        if (running >= remaining) return i;
      }
    }
    return last >= 0 ? last : argmaxes[node];
  }
};

template <typename scalar_t, typename prob_t>
void walk_all(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents, const prob_t* q,
              int64_t q_batch_stride, int64_t q_node_stride, const at::Tensor& seeds, float inv_t, int mode,
              const std::vector<SliceResult>& slices, const VocabSlices& cut, VerifyTreeOutputs& outputs) {
  const int64_t batch = logits.size(0), nodes = logits.size(1), width = outputs.accepted_nodes.size(1);
  const int64_t splits = cut.count();
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const float* max_logprob = outputs.stats.max_logprob.const_data_ptr<float>();
  const int64_t* argmaxes = outputs.stats.argmax.const_data_ptr<int64_t>();
  const int64_t* token_rows = tokens.const_data_ptr<int64_t>();
  const int64_t* parent_rows = parents.const_data_ptr<int64_t>();
  const int64_t* seed_rows = seeds.const_data_ptr<int64_t>();
  int64_t* num_accepted = outputs.num_accepted.data_ptr<int64_t>();
  int64_t* accepted = outputs.accepted_nodes.data_ptr<int64_t>();
  int64_t* emitted = outputs.output_tokens.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      CpuTreeRow<scalar_t, prob_t> row{base + b * logits.stride(0), logits.stride(1), logits.size(2), inv_t,
                                       max_logprob + b * nodes, argmaxes + b * nodes, slices.data() + b * nodes * splits,
                                       cut, splits, q ? q + b * q_batch_stride : nullptr, q_node_stride,
                                       parent_rows + b * nodes, token_rows + b * nodes, nodes};
      walk_tree(row, mode, static_cast<uint64_t>(seed_rows[b]), static_cast<uint64_t>(b), true, width, accepted + b * width,
                emitted + b * width, num_accepted + b);
    }
  });
}

VerifyTreeOutputs::Returns verify_tree_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                           const at::Tensor& parents, double temperature,
                                           const c10::optional<at::Tensor>& draft_probs, const at::Tensor& seeds,
                                           int64_t depth) {
  check_verify_tree_inputs(logits, tokens, parents, temperature, draft_probs, seeds, depth);
  VerifyTreeOutputs outputs = allocate_verify_tree_outputs(logits, depth);
  const int64_t batch = logits.size(0), nodes = logits.size(1), vocab = logits.size(2);
  if (batch == 0 || nodes == 0) return outputs.returns();
  const float stats_temperature = verify_statistics_temperature(temperature);
  RowLayout layout{batch, nodes, logits.stride(0), logits.stride(1), vocab};
  const StatsOutputPointers stats = outputs.stats.pointers(false, false);
  const int mode = verify_mode(temperature, draft_probs);
  std::vector<SliceResult> slices;
  const VocabSlices cut{vocab, kVerifySliceTokens};
  dispatch_cpu_float(logits.scalar_type(), "target_logits", [&](auto logits_tag) {
    using scalar_t = decltype(logits_tag);
    reduce_rows(logits.const_data_ptr<scalar_t>(), layout, [&](int64_t) { return stats_temperature; }, nullptr, 0,
                cut.slice_len, stats, &slices);
    if (mode != kVerifyMultiDraft) {
      walk_all<scalar_t, float>(logits, tokens, parents, nullptr, 0, 0, seeds, 1.f / stats_temperature, mode, slices,
                                cut, outputs);
      return;
    }
    const at::Tensor& q = *draft_probs;
    dispatch_cpu_float(q.scalar_type(), "draft_probs", [&](auto prob_tag) {
      using prob_t = decltype(prob_tag);
      walk_all<scalar_t, prob_t>(logits, tokens, parents, q.const_data_ptr<prob_t>(), q.stride(0), q.stride(1), seeds,
                                 1.f / stats_temperature, mode, slices, cut, outputs);
    });
  });
  return outputs.returns();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedecode, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }

}  // namespace cpu
}  // namespace fusedecode
