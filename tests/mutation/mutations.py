"""The curated list of plausible bugs for the mutation check (``tests/mutation/run.py``).

Each entry replaces one exact snippet of one file (it must occur exactly once) and names the
narrowest tests expected to catch it. Keep ``find`` short but unique; when code moves, update the
entry rather than deleting it. The bugs are the kind a careful reviewer would try: a sign, a missing
term, an off-by-one, a bound or a check removed, a residual or a window taken the wrong way.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: Tuple[str, ...]
    description: str

    @property
    def native(self):
        """Whether the extension must be rebuilt for this mutation to take effect."""
        return self.file.startswith("csrc/")


def M(id, file, find, replace, tests, description):
    selection = tests.split()
    if file in NOT_TRITON and "-k" not in selection:
        selection += ["-k", "not triton"]  # the Triton interpreter cannot see these files: skip its slow cases
    return Mutation(id, file, find, replace, tuple(selection), description)


STATS_REFERENCE = "python/fusedecode/ops/logit_stats/reference.py"
VERIFY_REFERENCE = "python/fusedecode/ops/verify_tree/reference.py"
STATS_STATE = "csrc/include/fusedecode/stats_state.h"
TREE_WALK = "csrc/include/fusedecode/tree_walk.h"
LOGIT_STATS_CPU = "csrc/cpu/logit_stats_cpu.cpp"
VERIFY_TREE_CPU = "csrc/cpu/verify_tree_cpu.cpp"
TRITON_STATS = "triton_kernels/logit_stats.py"
TRITON_VERIFY = "triton_kernels/verify_tree.py"
TREE = "python/fusedecode/tree.py"
DRAFT_TREE = "python/fusedecode/hf/speculative/draft_tree.py"
DRAFTER = "python/fusedecode/hf/speculative/drafter.py"
STEP = "python/fusedecode/hf/speculative/step.py"
SPEC_CONFIG = "python/fusedecode/hf/speculative/config.py"
ATTENTION = "python/fusedecode/hf/models/attention.py"
TRIGGER = "python/fusedecode/hf/correction/trigger.py"
TRIGGERS = "python/fusedecode/triggers.py"
PROCESSORS = "python/fusedecode/hf/processors.py"
VLLM_REFLECTION = "python/fusedecode/vllm/_reflection.py"
VLLM_API = "python/fusedecode/vllm/_api.py"
CONFIDENCE = "python/fusedecode/confidence.py"
VALIDATION = "python/fusedecode/_validation.py"
STATS_CHECKS = "python/fusedecode/ops/logit_stats/checks.py"
VERIFY_CHECKS = "python/fusedecode/ops/verify_tree/checks.py"
TILED_HEAD = "python/fusedecode/ops/_tiled_head.py"
HEAD_TRANSFORM = "python/fusedecode/head_transform.py"
LINEAR_CE = "python/fusedecode/ops/linear_ce/op.py"
SCORING = "python/fusedecode/hf/scoring.py"
STEPS = "python/fusedecode/steps.py"
REFLECTION = "python/fusedecode/reflection.py"
HF_REFLECTION = "python/fusedecode/hf/reflection.py"
SRGEN_LOOP = "python/fusedecode/hf/correction/generate.py"

NOT_TRITON = (STATS_REFERENCE, VERIFY_REFERENCE, STATS_STATE, TREE_WALK, LOGIT_STATS_CPU, VERIFY_TREE_CPU)

T_STATS = "tests/ops/logit_stats/test_logit_stats.py"
T_ADV = "tests/test_adversarial.py"
T_VERIFY = "tests/ops/verify_tree/test_verify_tree.py"
T_POWER = "tests/ops/verify_tree/test_power.py"
T_SPEC = "tests/hf/test_tree_speculative.py"
T_SPEC_EFF = "tests/hf/test_tree_speculative_efficiency.py"
T_API = "tests/test_api.py"
T_LLS = "tests/ops/linear_logit_stats/test_linear_logit_stats.py"
T_LCE = "tests/ops/linear_ce/test_linear_ce.py"
T_SCORE = "tests/hf/test_score.py"
T_STEPS = "tests/test_steps.py"
T_HF_REFLECTION = "tests/hf/test_reflection.py"
LOGIT_STATS_CUH = "csrc/include/fusedecode/logit_stats.cuh"
VERIFY_TREE_CUH = "csrc/include/fusedecode/verify_tree.cuh"
T_EMU_STATS = "tests/cuda_emulation/test_emulated_logit_stats.py"
T_EMU_VERIFY = "tests/cuda_emulation/test_emulated_verify_tree.py"

MUTATIONS = [
    # ---- the torch reference (the oracle every backend is compared with) -------------------------
    M("ref-entropy-sign", STATS_REFERENCE, "entropy = -(p * log_p_finite).sum(-1)",
      "entropy = (p * log_p_finite).sum(-1)",
      T_STATS, "entropy with the wrong sign"),
    M("ref-self-certainty-no-log-n", STATS_REFERENCE, "self_certainty = log_s - mean_gap - torch.log(count_f)",
      "self_certainty = log_s - mean_gap", T_STATS, "self-certainty without the - log n term"),
    M("ref-count-includes-masked", STATS_REFERENCE, "    count = finite.sum(-1)\n",
      "    count = torch.full_like(finite.sum(-1), x.shape[-1])\n", T_STATS,
      "-inf (masked) entries counted in n"),
    M("ref-topk-ignores-count", STATS_REFERENCE,
      "keep = torch.minimum(count, torch.tensor(topk, device=logits.device))",
      "keep = torch.full_like(count, topk)", T_STATS, "top-k mean over k even when the row has fewer finite entries"),
    M("ref-temperature-not-checked", STATS_REFERENCE, "invalid = poisoned | (count == 0) | ~temperature_ok",
      "invalid = poisoned | (count == 0)", T_ADV, "a temperature outside float32 gives numbers, not NaN"),
    M("ref-specinfer-residual-from-p", VERIFY_REFERENCE, "leftover = (residual - q).clamp_min(0)",
      "leftover = (p - q).clamp_min(0)", f"{T_VERIFY} {T_POWER}",
      "SpecInfer residual recomputed from p instead of the previous residual"),
    M("ref-specinfer-residual-unnormalised", VERIFY_REFERENCE, "            residual = leftover / total\n",
      "            residual = leftover\n", f"{T_VERIFY} {T_POWER}",
      "SpecInfer residual not renormalised"),
    # ---- the merge math shared by the cpp and CUDA kernels ------------------------------------------
    M("state-merge-no-cross-term", STATS_STATE, "out.wvar = fa * a.wvar + fb * b.wvar + fa * fb * delta * delta;",
      "out.wvar = fa * a.wvar + fb * b.wvar;", T_STATS, "Chan's merge without the between-slice variance term"),
    M("state-merge-tie-to-highest", STATS_STATE, "(b.max_x == a.max_x && b.argmax < a.argmax)",
      "(b.max_x == a.max_x && b.argmax > a.argmax)", T_STATS, "argmax ties across chunks go to the highest index"),
    M("state-shift-unclamped", STATS_STATE, "return shift < -kFarShift ? -kFarShift : shift;", "return shift;",
      T_ADV, "far states merged with an unclamped shift (0 * inf)"),
    M("state-self-certainty-no-log-n", STATS_STATE,
      "f.self_certainty = log_s - scaled_half_gap(s.half_gap_mean, inv_t) - logf(static_cast<float>(s.count));",
      "f.self_certainty = log_s - scaled_half_gap(s.half_gap_mean, inv_t);", T_STATS,
      "native self-certainty without the - log n term"),
    M("state-poison-dropped", STATS_STATE, "s.sum_exp = (poisoned || !(max_x < FD_INFINITY)) ? FD_NAN : s0;",
      "s.sum_exp = s0;", T_STATS, "a NaN/+inf chunk does not poison its row"),
    # ---- the cpp logit_stats kernel -----------------------------------------------------------------
    M("cpu-lane-tie-to-highest", LOGIT_STATS_CPU, "(lane_max[l] == chunk_max && lane_arg[l] < chunk_arg)",
      "(lane_max[l] == chunk_max && lane_arg[l] > chunk_arg)", T_STATS, "argmax ties across SIMD lanes go high"),
    M("cpu-padding-is-zero", LOGIT_STATS_CPU, "for (int64_t i = n; i < padded; ++i) buffer[i] = -kInf;",
      "for (int64_t i = n; i < padded; ++i) buffer[i] = 0.f;", T_STATS,
      "the SIMD tail of a chunk padded with 0 (a real token) instead of -inf"),
    M("cpu-chunk-min-ignored", LOGIT_STATS_CPU, "const bool masked = chunk_min == -kInf;",
      "const bool masked = false;", T_STATS, "chunks holding -inf (masked) entries summed as if every entry were finite"),
    # ---- the tree walk shared by the cpp and CUDA verify_tree ---------------------------------------
    M("walk-token-range-unchecked", TREE_WALK, "if (token < 0 || token >= row.vocab_size()) continue;",
      "if (token < 0) continue;", T_ADV, "validate=False: a draft token >= V is read and may be accepted"),
    M("walk-greedy-first-child", TREE_WALK,
      "choice = row.argmax(node);\n      child = row.child_with_token(node, choice);",
      "choice = row.argmax(node);\n      child = row.next_child(node, node);", T_VERIFY,
      "greedy accepts the first child whatever its token"),
    M("walk-specinfer-c-plus-one", TREE_WALK, "const float next_c = c + mass;", "const float next_c = c + 1.f;",
      f"{T_VERIFY} {T_POWER}",
      "SpecInfer residual after the second rejection built with c + 1 (wrong from the 2nd sibling on)"),
    M("walk-specinfer-ratio-unnormalised", TREE_WALK, "/ mass / q;", "/ q;",
      f"{T_VERIFY} {T_POWER}",
      "SpecInfer acceptance ratio not divided by the residual's mass"),
    # ---- the cpp verify_tree rows -------------------------------------------------------------------
    M("cpu-residual-no-clamp", VERIFY_TREE_CPU, "    return e > 0.f ? e : 0.f;\n", "    return e;\n",
      f"{T_VERIFY} {T_POWER}", "SpecInfer residual without max(., 0)"),
    # ---- Triton kernels (run under TRITON_INTERPRET=1) ----------------------------------------------
    M("triton-rescale-s2", TRITON_STATS,
      "s2 = tl.where(started, rescale * (s2 + delta * (2.0 * s1 + delta * s0)), 0.0)",
      "s2 = tl.where(started, rescale * (s2 + delta * s1), 0.0)", f"{T_STATS} -k triton",
      "second moment rescaled without the cross terms on a new block maximum"),
    M("triton-self-certainty-no-log-n", TRITON_STATS,
      "certainty = log_s - _scaled_half_gap(half_gap_mean, inv_t) - tl.log(tl.maximum(n, 1).to(tl.float32))",
      "certainty = log_s - _scaled_half_gap(half_gap_mean, inv_t)", f"{T_STATS} -k triton",
      "Triton self-certainty without the - log n term"),
    M("triton-specinfer-ratio", TRITON_VERIFY, "ratio = tl.maximum(p_x - c * q_x, 0.0) / mass / q_x",
      "ratio = tl.maximum(p_x - q_x, 0.0) / mass / q_x", f"{T_VERIFY} {T_POWER} -k triton",
      "Triton SpecInfer acceptance uses (p - q)+ from the first sibling on"),
    M("triton-walk-depth-unbounded", TRITON_VERIFY, "elif (child < N_PAD) & (count >= depth):",
      "elif (child < N_PAD) & (count > depth):", f"{T_VERIFY} {T_ADV} -k triton",
      "Triton walk may write one entry past depth + 1"),
    # ---- tree helpers ----------------------------------------------------------------------------------
    M("tree-mask-one-round-short", TREE, "range(max(n - 2, 0).bit_length())", "range(max(n - 3, 0).bit_length())",
      f"{T_VERIFY} {T_SPEC} tests/test_tree_helpers.py", "tree attention mask misses the deepest ancestors"),
    M("tree-depth-later-parent-linked", TREE, "linked = (p >= 0) & (p < index)", "linked = p >= 0", T_ADV,
      "reachable_depths follows links to later nodes (cycles)"),
    M("tree-paths-no-sharing", TREE, "                children[node][token] = child\n", "", "tests/test_tree_helpers.py",
      "tree_from_paths does not share common prefixes"),
    M("tree-next-sibling-first", TREE, "            last_child[parent] = i\n",
      "            last_child.setdefault(parent, i)\n", "tests/test_tree_helpers.py",
      "tree_to_next_sibling links every sibling to the first one"),
    M("tree-sibling-as-parent", TREE, "                parents[b, child] = node\n",
      "                parents[b, child] = previous\n", "tests/test_tree_helpers.py",
      "tree_from_next_sibling makes a node the child of its previous sibling"),
    # ---- tree speculation ---------------------------------------------------------------------------
    M("prune-worst-first", DRAFT_TREE, "drafted.sort(key=lambda i: (-self.cum_logprob[i], self.depths[i], i))",
      "drafted.sort(key=lambda i: (self.cum_logprob[i], self.depths[i], i))", T_SPEC_EFF,
      "pruning keeps the least probable nodes (still lossless: only efficiency changes)"),
    M("prune-off-by-one", DRAFT_TREE, "drafted = drafted[:max_nodes]", "drafted = drafted[:max_nodes - 1]", T_SPEC_EFF,
      "pruning keeps max_nodes - 1 nodes"),
    M("alpha-no-floor", SPEC_CONFIG, "return halved if halved >= config.min_alpha else min(alpha, config.min_alpha)",
      "return halved", T_SPEC_EFF, "LLMCad's alpha halves below min_alpha"),
    M("alpha-accepted-fraction", SPEC_CONFIG, "return 1.0 - accepted / drafted_depth",
      "return accepted / drafted_depth", T_SPEC, "alpha set to the accepted instead of the rejected fraction"),
    M("window-off-by-one", ATTENTION, "allowed & (distance < window)", "allowed & (distance <= window)",
      "tests/hf/test_architectures.py", "sliding window one key too wide"),
    M("draft-cache-drops-fed-slots", DRAFT_TREE,
      "fed = next((i for i, slot in enumerate(slots) if slot is None), len(slots))", "fed = 0", T_SPEC_EFF,
      "the draft cache keeps none of the accepted fed slots (re-fed each step; lossless but slower)"),
    M("multi-draft-without-replacement", DRAFTER,
      "torch.multinomial(logprobs.exp(), self.config.top_k, replacement=True)",
      "torch.multinomial(logprobs.exp(), self.config.top_k, replacement=False)",
      "tests/hf/test_tree_speculative_power.py",
      "multi-draft siblings drawn without replacement (not i.i.d.: SpecInfer is no longer lossless)"),
    M("stop-check-one-token-early", STEP, "self.stopping_criteria(row.ids[None, :base + i + 1], None)",
      "self.stopping_criteria(row.ids[None, :base + i], None)", T_SPEC,
      "stopping criteria see the ids before the token just emitted"),
    M("walk-drops-bonus-token", STEP, "RowWalk(count, row_nodes[:count + 1], row_tokens[:count + 1])",
      "RowWalk(count, row_nodes[:count + 1], row_tokens[:count])", T_SPEC,
      "the bonus/correction token is not committed"),
    M("greedy-verified-by-sampling", STEP, "temperature=1.0 if self.do_sample else 0.0", "temperature=1.0", T_SPEC,
      "greedy generation verified by sampling"),
    # ---- SRGen trigger ------------------------------------------------------------------------------
    M("trigger-one-step-late", TRIGGERS, "torch.where(state.count >= rule.window, threshold, warmup)",
      "torch.where(state.count > rule.window, threshold, warmup)", "tests/hf/test_srgen.py",
      "the adaptive threshold starts one step after the window is full"),
    M("trigger-one-correction-too-many", TRIGGER, "(self.corrections < config.max_corrections)",
      "(self.corrections <= config.max_corrections)", "tests/hf/test_srgen.py",
      "one correction more than max_corrections"),
    # ---- DeepConf online stop -----------------------------------------------------------------------
    M("confstop-window-wrong-end", PROCESSORS, "window_parts(confidence[-1 - self.window])",
      "window_parts(confidence[-self.window])", "tests/hf/test_processors.py",
      "the sliding window drops the wrong step (its newest instead of its oldest)"),
    M("confstop-one-step-early", PROCESSORS, "        if len(confidence) < self.window:\n            return scores",
      "        if len(confidence) < self.window - 1:\n            return scores", "tests/hf/test_processors.py",
      "the stop is tested before the window is full"),
    M("confstop-ignores-masked-eos", PROCESSORS, "stop = below & (eos_score > -math.inf) & ~self._ended",
      "stop = below & ~self._ended", "tests/hf/test_processors.py",
      "stops a row whose EOS another processor masked (min_new_tokens)"),
    M("window-mean-nan-leaks", CONFIDENCE, "return torch.where(nan | (positive & negative), math.nan, mean)",
      "return torch.where(nan, math.nan, mean)", "tests/test_deepconf_rule.py",
      "a window holding both infinities is -inf (stops) instead of NaN"),
    # ---- vLLM reflection insertion ------------------------------------------------------------------
    M("vllm-reflection-not-forced", VLLM_REFLECTION, "    logits.index_copy_(0, rows, torch.where(",
      "    0 and logits.index_copy_(0, rows, torch.where(", "tests/vllm/test_runner_v2.py -k reflection",
      "the engine records insertions but never forces their tokens"),
    M("vllm-step-insertion-at-its-delimiter", VLLM_API, "start = record + int(records[\"forced\"][record] < 0)",
      "start = record", "tests/vllm/test_runner_v2.py -k reflection",
      "a step trigger's insertion is reported at the delimiter, not after it"),
    # ---- trace confidence and votes -------------------------------------------------------------------
    M("threshold-wrong-percentile", CONFIDENCE, "np.percentile(values, 100 - keep_percent)",
      "np.percentile(values, keep_percent)", "tests/hf/test_confidence.py",
      "DeepConf-low and -high thresholds swapped"),
    M("bottom-rounds", CONFIDENCE, "count = max(1, int(groups.size * bottom))",
      "count = max(1, round(groups.size * bottom))", "tests/hf/test_confidence.py",
      "bottom-10% group count rounded instead of truncated"),
    M("deepconf-vote-strict", CONFIDENCE, "answer if weight >= threshold else None",
      "answer if weight > threshold else None", "tests/hf/test_confidence.py",
      "a trace exactly at the threshold does not vote"),
    M("borda-rank-off-by-one", CONFIDENCE, "weight = {index: (count - rank) ** power",
      "weight = {index: (count - rank - 1) ** power", "tests/hf/test_confidence.py",
      "Borda weights (N - r) instead of (N - r + 1)"),
    M("borda-unstable-ties", CONFIDENCE,
      "order = sorted(range(count), key=lambda i: -values[i] if not math.isnan(values[i]) else math.inf)",
      "order = sorted(range(count), key=lambda i: -values[i] if not math.isnan(values[i]) else math.inf, "
      "reverse=True)[::-1]", "tests/hf/test_confidence.py",
      "equal self-certainties rank by reverse candidate order"),
    M("filter-top-strict", CONFIDENCE, "return [bool(value >= threshold) for value in values]",
      "return [bool(value > threshold) for value in values]", "tests/hf/test_confidence.py",
      "ties at the top-fraction cut are dropped"),
    # ---- argument validation ------------------------------------------------------------------------
    M("val-self-parent-allowed", VALIDATION, "bad = (rows < 0) | (rows >= index)", "bad = (rows < 0) | (rows > index)",
      f"{T_VERIFY} {T_ADV}", "a node may be its own parent (a cycle)"),
    M("val-draft-token-upper-bound", VERIFY_CHECKS, 'draft_tokens[:, 1:], -1, vocab, " (entry 0 is ignored)"',
      'draft_tokens[:, 1:], -1, vocab + 1, " (entry 0 is ignored)"', f"{T_VERIFY} {T_ADV}",
      "a draft token equal to V passes validation"),
    M("val-token-ids-unchecked", STATS_CHECKS, '        check_values_in_range("token_ids", token_ids, 0, logits.shape[-1])\n',
      "", f"{T_STATS} {T_API}", "token_ids outside [0, V) reach the kernels"),
    M("val-topk-unbounded", STATS_CHECKS, 'logits.shape[-1])\n    check_int("topk", topk, 0, MAX_TOPK)',
      'logits.shape[-1])\n    check_int("topk", topk, 0)',
      f"{T_STATS} {T_API}", "topk above 64 accepted"),
    M("val-temperature-reciprocal", VALIDATION,
      "return t32 > 0 and math.isfinite(t32) and math.isfinite(_to_float32(1.0 / t32))",
      "return t32 > 0 and math.isfinite(t32)", T_ADV, "a temperature whose reciprocal overflows float32 accepted"),
    M("val-draft-probs-strided", VERIFY_CHECKS, '        check_last_dim_contiguous("draft_probs", draft_probs)\n', "",
      T_VERIFY, "draft_probs with a strided last dimension reach the kernels"),
    M("val-draft-probs-wider", VERIFY_CHECKS, "if draft_probs.shape[2] != vocab:", "if draft_probs.shape[2] < vocab:",
      T_VERIFY, "draft_probs wider than the target's vocabulary accepted"),
    M("val-seed-unbounded", VERIFY_CHECKS, 'check_int("seed", seed, 0, 2**63 - 1)', 'check_int("seed", seed, 0)', T_ADV,
      "seeds of 2^63 and more wrap silently"),
    # ---- the tiled head (linear_logit_stats, linear_cross_entropy_entropy) and hf.score ------------
    M("head-partial-slice-dropped", TILED_HEAD, "for start in range(0, vocab, step):",
      "for start in range(0, vocab // step * step, step):", T_LLS,
      "widening a half-precision weight drops the last partial slice of the vocabulary"),
    M("head-bias-lost-with-delta", TILED_HEAD,
      "offset = bias.to(accumulate).contiguous() if offset is None else offset + bias.to(accumulate)",
      "offset = bias.to(accumulate).contiguous() if offset is None else offset", T_LCE,
      "the lm_head bias is dropped when SRGen's delta is given"),
    M("head-transform-order", HEAD_TRANSFORM,
      "    if logit_scale is not None:\n        logits.mul_(logit_scale)\n    if softcap is not None:\n"
      "        logits.div_(softcap).tanh_().mul_(softcap)",
      "    if softcap is not None:\n        logits.div_(softcap).tanh_().mul_(softcap)\n"
      "    if logit_scale is not None:\n        logits.mul_(logit_scale)", f"{T_LLS} {T_LCE}",
      "soft-capping applied before the logit scale"),
    M("head-slope-without-scale", HEAD_TRANSFORM, "(transformed / softcap).square_().neg_().add_(1.0).mul_(scale)",
      "(transformed / softcap).square_().neg_().add_(1.0)", T_LCE,
      "the soft-cap derivative forgets the logit scale (gradients wrong with both)"),
    M("lce-entropy-grad-sign", LINEAR_CE, "torch.mul(p * (log_p + row_entropy), -inv_temperature, out=entropy_grad)",
      "torch.mul(p * (log_p + row_entropy), inv_temperature, out=entropy_grad)", T_LCE,
      "the entropy gradient with the wrong sign"),
    M("lce-ignored-rows-counted", LINEAR_CE, "    counted = ~ignored & ~out_of_range\n",
      "    counted = ~out_of_range\n", T_LCE, "rows with ignore_index get a cross-entropy gradient"),
    M("score-hidden-shifted", SCORING, "hidden[:, :-1].to(head.weight.dtype)", "hidden[:, 1:].to(head.weight.dtype)",
      T_SCORE, "score reads the hidden state of token t + 1 for the distribution of token t + 1"),
    M("score-positions-off-by-one", SCORING, "(attention_mask.long().cumsum(-1) - 1).clamp_min(0)",
      "attention_mask.long().cumsum(-1)", T_SCORE, "positions counted from 1 (absolute-position models drift)"),
    M("score-only-next-token-masked", SCORING, "valid = real[:, 1:] & real[:, :-1]", "valid = real[:, 1:]", T_SCORE,
      "a position whose own token is (left) padding is scored"),
    # ---- reasoning steps and reflection insertion ------------------------------------------------------
    M("steps-delimiter-straddles-boundary", STEPS,
      "ends = (matches & (table.lengths <= length.unsqueeze(1))).any(dim=1)", "ends = matches.any(dim=1)",
      f"{T_STEPS} {T_HF_REFLECTION}", "a delimiter occurrence that starts in the previous step (or the prompt) ends a step"),
    M("steps-tail-summed-newest-first", STEPS, "for age in range(tail - 1, -1, -1):", "for age in range(tail):",
      T_STEPS, "the online tail is summed in another order than offline (not bit for bit equal)"),
    M("steps-min-ignores-nan", STEPS, "torch.where(keep, torch.minimum(state.minimum, values), state.minimum)",
      "torch.where(keep, torch.fmin(state.minimum, values), state.minimum)", T_STEPS,
      "the online step minimum skips NaN instead of giving NaN"),
    M("steps-last-step-never-terminated", PROCESSORS,
      "last_ends = count > 0 and bool(index[row, count] != index[row, count - 1])", "last_ends = False",
      T_HF_REFLECTION, "UncertaintyProcessor.steps never marks a row's last step as ended by a delimiter"),
    M("steps-prompt-token-ingested", PROCESSORS,
      "            self._cutter = new_cutter(input_ids.shape[0], table, input_ids.device)\n",
      "            self._cutter, _ = cut_step(table, new_cutter(input_ids.shape[0], table, input_ids.device), "
      "input_ids[:, -1])\n", T_HF_REFLECTION, "the prompt's last token counts as the first step's"),
    M("reflect-retests-inserted-step", REFLECTION, "tested = ended & ~state.step_inserted & (state.forcing < 0)",
      "tested = ended & (state.forcing < 0)", T_STEPS, "a step holding inserted tokens is tested at its end"),
    M("reflect-tests-first-token", REFLECTION, "tested = rows & free & (state.position >= 1)",
      "tested = rows & free & (state.position >= 0)", T_STEPS, "SRGen's rule tests the prompt's token"),
    M("reflect-one-insertion-too-many", REFLECTION,
      "fire = fire & (state.insertions < rules.config.max_insertions)",
      "fire = fire & (state.insertions <= rules.config.max_insertions)", T_STEPS, "max_insertions + 1 insertions"),
    M("reflect-inserts-at-the-delimiter", REFLECTION,
      "state = _start_insertions(rules, state, fire, trigger, value, threshold, next_position)",
      "state = _start_insertions(rules, state, fire, trigger, value, threshold, state.position)", T_STEPS,
      "a step-triggered insertion is recorded at the delimiter's position instead of the next"),
    M("reflect-ended-rows-tested", HF_REFLECTION, "        self._ended = self._ended | torch.isin(token, self._eos)\n",
      "", T_HF_REFLECTION, "rows that emitted EOS keep being tested and recorded"),
    M("reflect-srgen-corrects-inserted", SRGEN_LOOP,
      "            active = active & ~_inserted_rows(choice.logits_processor, active)", "            pass",
      T_HF_REFLECTION, "srgen corrects a step whose token the insertion forces"),
    # The CUDA kernels, executed on the CPU by the emulator of tests/cuda_emulation.
    M("cuda-one-slice-state-unwritten", LOGIT_STATS_CUH, "if (p.splits == 1 && p.partial_states != nullptr) {",
      "if (false) {", f"{T_EMU_VERIFY} -k sample",
      "verify_tree rows of one slice (V <= 4096) keep no slice state: sampling reads unwritten memory"),
    M("cuda-topk-threshold-off-by-one", LOGIT_STATS_CUH, "__shfl_sync(kFullMask, lo, k - 1)",
      "__shfl_sync(kFullMask, lo, k)", f"{T_EMU_STATS} -k every_topk", "a warp's top-k threshold is its (k+1)-th value"),
    M("cuda-no-last-block", LOGIT_STATS_CUH, "1u) == static_cast<unsigned>(p.splits - 1);",
      "1u) == static_cast<unsigned>(p.splits);", f"{T_EMU_STATS} -k random_rows",
      "no CTA of a split row sees itself last: the row's outputs are never written"),
    M("cuda-head-ignores-alignment", LOGIT_STATS_CUH, "head = misaligned ? min64(kVec - misaligned, vocab) : 0;",
      "head = 0;", f"{T_EMU_STATS} -k strided", "rows off the 16-byte grid are read with 16-byte loads from their start"),
    M("cuda-cta-max-scratch-race", VERIFY_TREE_CUH, "m = fmaxf(m, s.f[w]);\n  __syncthreads();",
      "m = fmaxf(m, s.f[w]);", f"{T_EMU_VERIFY} -k sample",
      "the walk's scratch is reused before every warp has read the maximum"),
    M("cuda-sample-slice-unclamped", VERIFY_TREE_CUH, "const int64_t hi = cut.token_end(chosen);",
      "const int64_t hi = cut.token_begin(chosen) + kVerifySliceTokens;", f"{T_EMU_VERIFY} -k sample",
      "the sampled slice's end is not clamped to the row (reads past V)"),
    M("tree-root-sibling-ignored", TREE, "    bad_root = torch.nonzero(ns[:, 0] != -1)\n",
      "    bad_root = torch.nonzero(ns[:, 0] < -1)\n", "tests/test_tree_helpers.py",
      "tree_from_next_sibling accepts a root with a next sibling"),
]
