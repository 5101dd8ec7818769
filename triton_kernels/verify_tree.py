"""Triton kernels of ``verify_tree``: one pass over every node's logits, then a walk per tree.

Definitions: ``python/fusedecode/ops/verify_tree/op.py``. Pass 1 is logit_stats' split path with fixed
``SLICE_TOKENS``-token slices: every (node row, slice) program leaves a mergeable state (max, sum
exp, ...; the workspace layout of ``triton_kernels/logit_stats.py``) and the merge kernel writes each
node's stats. The walk kernel (one program per batch row) then follows the tree:

- greedy: the argmax of the node's row (already computed);
- sampling: inverse CDF with one uniform ``u`` per (seed, row, node): the slice whose cumulative
  mass crosses ``u * S`` is found from the slice states, and only that slice is read again;
- multi-draft (SpecInfer): children are tried in index order, with the residual in the closed form
  of ``csrc/include/fusedecode/tree_walk.h``, so each rejection costs one pass over that node's
  logits and draft probabilities, and the final sample one more.

Random numbers are Philox (``tl.rand``) keyed by the row's seed and counter (row, node, purpose), so
they do not depend on the launch shape.
"""

import triton
import triton.language as tl

from .logit_stats import (STATE_MAX_X, STATE_SUM_EXP, _launch_slices, _load_f32, _merge_shift, load_state_field,
                          slice_bounds)

# Tokens per slice of the statistics pass (kVerifySliceTokens in csrc/include/fusedecode/vocab_slices.h
# for the native backends): sampling reads one slice again.
SLICE_TOKENS = 4096
SLICE = tl.constexpr(SLICE_TOKENS)
SAMPLE = tl.constexpr(0)
ACCEPT = tl.constexpr(1)


@triton.jit
def _uniform(seed, row, node, nodes, purpose):
    return tl.rand(seed, ((row * nodes + node) * 2 + purpose).to(tl.int32))


@triton.jit
def _sample_from_slices(row_ptr, vocab, inv_t, state_ptr, count_ptr, slot0, splits, u,
                        SPLITS_PAD: tl.constexpr, SCAN: tl.constexpr):
    """Inverse-CDF sample of softmax(x * inv_t) over one row using its slice states."""
    s = tl.arange(0, SPLITS_PAD)
    used = (s < splits) & (tl.load(count_ptr + slot0 + s, mask=s < splits, other=0) > 0)
    sum_s = load_state_field(state_ptr, slot0 + s, STATE_SUM_EXP, used, 0.0)
    max_x_s = load_state_field(state_ptr, slot0 + s, STATE_MAX_X, used, -float("inf"))
    max_x = tl.max(max_x_s, axis=0)
    mass = tl.where(used, sum_s * tl.exp(_merge_shift(max_x_s, max_x, inv_t)), 0.0)
    cumulative = tl.cumsum(mass, axis=0)
    target = u * tl.sum(mass, axis=0)
    crossing = tl.min(tl.where((cumulative >= target) & (mass > 0), s, SPLITS_PAD), axis=0)
    last_used = tl.max(tl.where(mass > 0, s, -1), axis=0)
    chosen = tl.where(crossing < SPLITS_PAD, crossing, last_used)
    remaining = target - tl.sum(tl.where(s < chosen, mass, 0.0), axis=0)
    # Rescan the chosen slice in token order, with the weights relative to the row max.
    start, end = slice_bounds(chosen, SLICE, vocab)
    lanes = tl.arange(0, SCAN)
    token = -1
    last_positive = -1
    running = 0.0
    for block in range(0, SLICE, SCAN):
        index = start + block + lanes
        x = _load_f32(row_ptr + index, index < end, -float("inf"))
        # (x - max_x) / T: -inf (weight 0) where the gap overflows; never 0 * inf.
        weight = tl.where(x != -float("inf"), tl.exp((x - max_x) * inv_t), 0.0)
        within = running + tl.cumsum(weight, axis=0)
        hit = tl.min(tl.where((within >= remaining) & (weight > 0), index, 2147483647), axis=0)
        token = tl.where((token < 0) & (hit < 2147483647), hit, token)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(weight > 0, index, -1), axis=0))
        running += tl.sum(weight, axis=0)
    return tl.where(token >= 0, token, last_positive)


@triton.jit
def _residual_pass(row_ptr, q_ptr, vocab, inv_t, max_x, log_s, c, target, SCAN: tl.constexpr):
    """Mass of (p - c q)+ over the row, and the first token whose cumulative mass reaches `target`
    (-1 if none; pass target = +inf to only measure). p = exp((x - max_x) / T - log_s)."""
    lanes = tl.arange(0, SCAN)
    total = 0.0
    token = -1
    last_positive = -1
    for block in range(0, vocab, SCAN):
        index = block + lanes
        inside = index < vocab
        x = _load_f32(row_ptr + index, inside, -float("inf"))
        q = _load_f32(q_ptr + index, inside, 0.0)
        p = tl.where(x != -float("inf"), tl.exp((x - max_x) * inv_t - log_s), 0.0)
        excess = tl.maximum(p - c * q, 0.0)
        within = total + tl.cumsum(excess, axis=0)
        hit = tl.min(tl.where((within >= target) & (excess > 0), index, 2147483647), axis=0)
        token = tl.where((token < 0) & (hit < 2147483647), hit, token)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(excess > 0, index, -1), axis=0))
        total += tl.sum(excess, axis=0)
    return total, token, last_positive


@triton.jit
def _walk_kernel(logits_ptr, stride_b, stride_n, vocab, nodes, tokens_ptr, parents_ptr, seeds_ptr, inv_t,
                 max_logprob_ptr, argmax_ptr, state_ptr, count_ptr, splits, q_ptr, q_stride_b, q_stride_n,
                 num_accepted_ptr, accepted_nodes_ptr, output_tokens_ptr, depth,
                 MODE: tl.constexpr, N_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SCAN: tl.constexpr):
    """MODE 0 greedy, 1 target-only sampling, 2 multi-draft (SpecInfer). One program per tree.

    The same walk as csrc/include/fusedecode/tree_walk.h, memory-safe on invalid input: a child has
    a larger index than its parent (so a node with an out-of-range or later parent is unreachable),
    a draft token outside [0, V) is never accepted or read, and depth + 1 bounds the writes."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, N_PAD)
    in_tree = idx < nodes
    parents = tl.load(parents_ptr + b * nodes + idx, mask=in_tree, other=-2)
    tokens = tl.load(tokens_ptr + b * nodes + idx, mask=in_tree, other=-1)
    seed = tl.load(seeds_ptr + b)
    out_row = b * (depth + 1)
    tl.store(accepted_nodes_ptr + out_row, 0)
    node = 0
    count = 0
    walking = True
    while walking:
        row = b * nodes + node
        row_ptr = logits_ptr + b * stride_b + node * stride_n
        row_argmax = tl.load(argmax_ptr + row).to(tl.int32)
        valid = row_argmax >= 0
        is_child = (parents == node) & (idx > node) & in_tree
        child = N_PAD
        choice = -1
        if MODE == 0:
            choice = row_argmax
            child = tl.min(tl.where(is_child & (tokens == choice), idx, N_PAD), axis=0)
        elif MODE == 1:
            u = _uniform(seed, b, node, nodes, SAMPLE)
            choice = _sample_from_slices(row_ptr, vocab, inv_t, state_ptr, count_ptr, row * splits, splits, u,
                                         SPLITS_PAD, SCAN)
            choice = tl.where(choice >= 0, choice, row_argmax)
            child = tl.min(tl.where(is_child & (tokens == choice), idx, N_PAD), axis=0)
        else:
            log_s = -tl.load(max_logprob_ptr + row)
            max_x = _load_f32(row_ptr + tl.maximum(row_argmax, 0), True, 0.0)
            q_row = q_ptr + b * q_stride_b + node * q_stride_n
            c = 0.0
            mass = 1.0
            candidate = tl.min(tl.where(is_child, idx, N_PAD), axis=0)
            while candidate < N_PAD:
                x = tl.sum(tl.where(idx == candidate, tokens, 0), axis=0)
                in_vocab = (x >= 0) & (x < vocab)  # padding, or out of range: never read, never accepted
                safe_x = tl.where(in_vocab, x, 0)
                q_x = _load_f32(q_row + safe_x, True, 0.0)
                drawable = in_vocab & (q_x > 0) & (q_x < float("inf"))
                p_x = tl.exp((_load_f32(row_ptr + safe_x, True, 0.0) - max_x) * inv_t - log_s)
                ratio = tl.maximum(p_x - c * q_x, 0.0) / mass / q_x
                u = _uniform(seed, b, candidate, nodes, ACCEPT)
                accepted = drawable & (u < ratio)
                next_candidate = tl.min(tl.where(is_child & (idx > candidate), idx, N_PAD), axis=0)
                if accepted:
                    child = candidate
                    next_candidate = N_PAD
                elif drawable:
                    new_c = c + mass
                    new_mass, _unused, _unused2 = _residual_pass(row_ptr, q_row, vocab, inv_t, max_x, log_s, new_c,
                                                                 float("inf"), SCAN)
                    if new_mass > 0:
                        c = new_c
                        mass = new_mass
                candidate = next_candidate
            if child == N_PAD:
                u = _uniform(seed, b, node, nodes, SAMPLE)
                if c == 0.0:
                    choice = _sample_from_slices(row_ptr, vocab, inv_t, state_ptr, count_ptr, row * splits, splits,
                                                 u, SPLITS_PAD, SCAN)
                else:
                    _total, hit, last = _residual_pass(row_ptr, q_row, vocab, inv_t, max_x, log_s, c, u * mass,
                                                       SCAN)
                    choice = tl.where(hit >= 0, hit, last)
                choice = tl.where(choice >= 0, choice, row_argmax)
        if not valid:
            walking = False
        elif (child < N_PAD) & (count >= depth):
            walking = False  # depth + 1 entries written (a wrong depth ends the walk, never overflows)
        elif child < N_PAD:
            count += 1
            tl.store(output_tokens_ptr + out_row + count - 1, tl.sum(tl.where(idx == child, tokens, 0), axis=0))
            tl.store(accepted_nodes_ptr + out_row + count, child)
            node = child
        else:
            tl.store(output_tokens_ptr + out_row + count, choice)
            walking = False
    tl.store(num_accepted_ptr + b, count)


def verify_tree_triton(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth, outputs, stats):
    """verify_tree on ``target_logits`` ``[B, N, V]`` (the arguments as the custom op
    ``fusedecode::verify_tree`` takes them) into ``outputs``, the op's fields by name as
    ``fusedecode.ops.verify_tree.allocate_outputs`` makes them. ``stats`` maps every LogitStats
    field to where the statistics pass writes it: the ``[B, N]`` tensors of ``outputs``, and empty
    ones for the fields verify_tree does not return."""
    batch, nodes, vocab = target_logits.shape
    stats_temperature = temperature if temperature > 0 else 1.0
    splits = -(-vocab // SLICE_TOKENS)
    state_ws, count_ws, _, _ = _launch_slices(target_logits, None, stats_temperature, None, 0, splits, SLICE_TOKENS,
                                              stats)
    if batch == 0 or nodes == 0:
        return  # no node row: the walk would read statistics the pass above never wrote
    mode = 0 if temperature == 0 else (1 if draft_probs is None else 2)
    q = draft_probs if draft_probs is not None else target_logits
    _walk_kernel[(batch,)](
        target_logits, target_logits.stride(0), target_logits.stride(1), vocab, nodes, draft_tokens, parents, seeds,
        1.0 / stats_temperature, stats["max_logprob"], stats["argmax"], state_ws, count_ws, splits, q, q.stride(0),
        q.stride(1), num_accepted_ptr=outputs["num_accepted"], accepted_nodes_ptr=outputs["accepted_nodes"],
        output_tokens_ptr=outputs["output_tokens"], depth=depth, MODE=mode,
        N_PAD=max(2, triton.next_power_of_2(nodes)), SPLITS_PAD=max(2, triton.next_power_of_2(splits)), SCAN=1024,
        num_warps=4)
