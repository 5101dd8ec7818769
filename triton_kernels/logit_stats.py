"""Triton kernels of ``logit_stats``: one pass over each row of logits.

Definitions: ``python/fusedecode/ops/logit_stats/op.py``. Every field is computed relative to the row
maximum, in the form of ``csrc/include/fusedecode/stats_state.h`` (never a difference of two large
numbers); the outputs are written by name (``<field>_ptr`` arguments, the fields of the op's output
table).

A program walks its row (or a slice of it) in blocks of ``BLOCK`` lanes. Every lane keeps
exp-weighted sums ``s0 = sum 2^d, s1 = sum d 2^d, s2 = sum d^2 2^d`` with ``d = (x - m) * log2(e) / T``
(clamped at -FAR_EXP2, where the weight is 0, so far entries such as -1e20 or finfo.min add exactly
nothing and every product stays finite) relative to the program's running max ``m``; when a block
raises ``m`` all lanes are rescaled once (and the argmax is taken from that block). The uniform mean
of the gaps ``x - m`` is summed per lane as it is and, for when that overflows (finfo.min next to
finfo.max), also scaled by ``WIDE_SCALE``.
At the end the lanes are combined with Chan's weighted-variance formula, which avoids the
cancellation of ``E[d^2] - E[d]^2`` over a whole row. For few rows, ``_partial_kernel`` reduces vocab
slices to mergeable states and ``_merge_kernel`` combines them (the same state as
``csrc/include/fusedecode/stats_state.h``: the gap mean is kept as a mean of halved gaps; the
workspace layout below is what verify_tree's sampling reads back). With
``WITH_TOPK`` each program keeps its ``TOPK_PAD`` (k rounded up to a power of two) largest raw logits,
touching them only for blocks whose max beats the current smallest kept value.

Masked entries (-inf) carry no probability; NaN or +inf poison the row's sums, and the row's float
outputs become NaN with argmax -1. Row offsets are int64.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FAR_EXP2 = tl.constexpr(150.0)  # 2^-150 is 0 in float32
FAR_SHIFT = tl.constexpr(128.0)  # exp(-128) is 0 in float32
# Lane sums of up to 2^20 gaps (V < 2^31 over >= 2048 lanes) of up to 2 * FLT_MAX fit after this scale.
WIDE_SCALE = tl.constexpr(2.0**-22)

# The split path's workspace: per (row, slice) slot, the float fields of StatsState
# (csrc/include/fusedecode/stats_state.h) in this order, then the count and argmax in their own
# int32 buffers. Slice s of a row covers tokens [s * slice_len, min((s + 1) * slice_len, V)).
STATE_FIELDS = ("ref", "sum_exp", "wmean", "wvar", "half_gap_mean", "max_x")
STATE_FLOATS = tl.constexpr(len(STATE_FIELDS))
STATE_REF = tl.constexpr(STATE_FIELDS.index("ref"))
STATE_SUM_EXP = tl.constexpr(STATE_FIELDS.index("sum_exp"))
STATE_WMEAN = tl.constexpr(STATE_FIELDS.index("wmean"))
STATE_WVAR = tl.constexpr(STATE_FIELDS.index("wvar"))
STATE_HALF_GAP_MEAN = tl.constexpr(STATE_FIELDS.index("half_gap_mean"))
STATE_MAX_X = tl.constexpr(STATE_FIELDS.index("max_x"))


@triton.jit
def _load_f32(ptr, mask, other):
    """Load and upcast to float32. bfloat16 is widened from its bits, which is exact for every value
    (the GPU does the same; the Triton interpreter's own bf16 conversion flushes subnormals)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return tl.where(mask, (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True), other)
    else:
        return tl.load(ptr, mask=mask, other=other).to(tl.float32)


@triton.jit
def slice_bounds(split, slice_len, vocab):
    """Tokens [start, end) of slice ``split`` of a row (the workspace layout above)."""
    start = split * slice_len
    return start, tl.minimum(start + slice_len, vocab)


@triton.jit
def load_state_field(state_ptr, slot, FIELD: tl.constexpr, mask, other):
    """One float field (``STATE_*``) of the state in workspace slot(s) ``slot``."""
    return tl.load(state_ptr + slot * STATE_FLOATS + FIELD, mask=mask, other=other)


@triton.jit
def _scaled_half_gap(half, inv_t):
    """2 * half * inv_t, multiplied in the order that overflows only when the exact value does."""
    return tl.where(inv_t >= 1.0, (2.0 * half) * inv_t, 2.0 * (half * inv_t))


@triton.jit
def _merge_shift(max_x, out_max_x, inv_t):
    """(max_x - out_max_x) / T without overflow, clamped where exp() is 0."""
    shift = _scaled_half_gap(0.5 * max_x - 0.5 * out_max_x, inv_t)
    return tl.where(shift < -FAR_SHIFT, -FAR_SHIFT, shift)


@triton.jit
def _exp2_arg(x, m, scale2, inv_t):
    """log2(e) * (x - m) / T clamped at -FAR_EXP2 (NaN passes and poisons). Outside
    2^-118 <= 1/T with a finite scale2 (that is T < 4e-39 or T > 3e35), from the halved gap, as
    robust_exp2_arg in stats_state.h: there the scale overflows, or an overflowing x - m (finfo.min
    next to finfo.max) has a finite scaled value."""
    if (scale2 < float("inf")) & (inv_t >= 2.0**-118):
        d2 = (x - m) * scale2
    else:
        d2 = _scaled_half_gap(0.5 * x - 0.5 * m, inv_t) * LOG2E
    return tl.where(d2 < -FAR_EXP2, -FAR_EXP2, d2)


@triton.jit
def _topk_absorb(top, values, N: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Merge ``values`` ([N]) into ``top``, the TOPK_PAD largest values seen (unsorted, -inf padded).

    Moves the largest remaining candidate into the slot of the smallest kept value until no
    candidate beats it: as many steps as values enter, which after a few blocks is usually none.
    """
    slots = tl.arange(0, TOPK_PAD)
    positions = tl.arange(0, N)
    threshold = tl.min(top, axis=0)
    candidates = tl.where(values > threshold, values, -float("inf"))
    best = tl.max(candidates, axis=0)
    while best > threshold:
        top = tl.where(slots == tl.argmin(top, axis=0), best, top)
        candidates = tl.where(positions == tl.argmax(candidates, axis=0), -float("inf"), candidates)
        threshold = tl.min(top, axis=0)
        best = tl.max(candidates, axis=0)
    return top


@triton.jit
def _accumulate(row_ptr, start, end, scale2, inv_t, BLOCK: tl.constexpr, WITH_TOPK: tl.constexpr,
                TOPK_PAD: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    running_max = -float("inf")
    argmax = tl.full([], 2147483647, dtype=tl.int32)  # first index of running_max
    s0 = tl.zeros([BLOCK], dtype=tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    gap_sum = tl.zeros([BLOCK], dtype=tl.float32)   # sum of x - running_max (-inf once it overflows)
    wide_sum = tl.zeros([BLOCK], dtype=tl.float32)  # the same times WIDE_SCALE (never overflows)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    top = tl.full([TOPK_PAD], -float("inf"), dtype=tl.float32)
    for block_start in range(start, end, BLOCK):
        index = block_start + lanes
        x = _load_f32(row_ptr + index, index < end, -float("inf"))
        block_max = tl.max(x, axis=0)
        if block_max > running_max:
            # The first index of the new max (a later block only takes over with a larger value, so
            # ties go to the lowest index), then every lane's sums move to the new reference:
            # d' = d + delta, weights scale by 2^delta (delta clamped: a far jump zeroes the
            # weights, products stay finite).
            argmax = block_start + tl.argmax(x, axis=0, tie_break_left=True)
            gap = running_max - block_max
            delta = _exp2_arg(running_max, block_max, scale2, inv_t)
            rescale = tl.exp2(delta)
            started = s0 != 0  # keeps NaN (a poisoned lane) poisoned
            s2 = tl.where(started, rescale * (s2 + delta * (2.0 * s1 + delta * s0)), 0.0)
            s1 = tl.where(started, rescale * (s1 + delta * s0), 0.0)
            s0 = tl.where(started, rescale * s0, 0.0)
            seen = count > 0
            lane_count = count.to(tl.float32)
            gap_sum = tl.where(seen, gap_sum + lane_count * gap, gap_sum)
            wide_sum = tl.where(seen, wide_sum + lane_count * (running_max * WIDE_SCALE - block_max * WIDE_SCALE),
                                wide_sum)
            running_max = block_max
        finite = x != -float("inf")  # NaN counts as finite here so that it poisons the sums
        gap = x - running_max  # exactly 0 at the max
        d2 = tl.where(finite, _exp2_arg(x, running_max, scale2, inv_t), 0.0)
        e = tl.where(finite, tl.exp2(d2), 0.0)
        de = d2 * e
        s0 += e
        s1 += de
        s2 += de * d2
        gap_sum += tl.where(finite, gap, 0.0)
        wide_sum += tl.where(finite, tl.fma(x, WIDE_SCALE, -running_max * WIDE_SCALE), 0.0)
        count += finite.to(tl.int32)
        if WITH_TOPK:
            if block_max > tl.min(top, axis=0):
                top = _topk_absorb(top, x, BLOCK, TOPK_PAD)

    # Combine lanes (all relative to running_max) with Chan's formula.
    weight = tl.sum(s0, axis=0)
    lane_mean = tl.where(s0 > 0, s1 / s0, 0.0)
    mean2 = tl.sum(s1, axis=0) / weight
    lane_var = tl.where(s0 > 0, s2 / s0 - lane_mean * lane_mean, 0.0)
    centred = lane_mean - mean2
    var2 = tl.sum(s0 * (lane_var + centred * centred), axis=0) / weight
    n = tl.sum(count, axis=0)
    # The gap mean as a sum of lane shares of it (a plain sum over lanes could overflow): the
    # unscaled sums, exact down to subnormal gaps, unless one of them overflowed.
    n_f = tl.maximum(n, 1).to(tl.float32)
    plain_mean = tl.sum(gap_sum / n_f, axis=0)
    wide_mean = tl.sum(wide_sum / n_f, axis=0)
    half_gap_mean = tl.where(plain_mean > -float("inf"), 0.5 * plain_mean, (0.5 / WIDE_SCALE) * wide_mean)
    return running_max, weight, mean2, var2, half_gap_mean, n, argmax, top


@triton.jit
def _to_state(running_max, weight, mean2, var2, inv_t):
    """Raw lane sums -> (ref, sum_exp, wmean, wvar) in natural-log units, as stats_state.h."""
    poisoned = (weight != weight) | (running_max == float("inf"))
    ref = running_max * inv_t
    sum_exp = tl.where(poisoned, float("nan"), weight)
    wmean = LN2 * mean2
    wvar = LN2 * LN2 * tl.maximum(var2, 0.0)
    return ref, sum_exp, wmean, wvar


@triton.jit
def _finalize_store(row, row_ptr, vocab, t, inv_t, max_x, sum_exp, wmean, wvar, half_gap_mean, n, argmax, top, topk,
                    token_ptr, logsumexp_ptr, entropy_ptr, varentropy_ptr, self_certainty_ptr, max_logprob_ptr,
                    argmax_ptr, token_logprob_ptr, topk_confidence_ptr, HAS_TOKEN: tl.constexpr,
                    WITH_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    valid = (t > 0) & (t < float("inf")) & (inv_t < float("inf")) & (n > 0) & (sum_exp == sum_exp)
    log_s = tl.log(sum_exp)
    lse = max_x * inv_t + log_s
    nan = float("nan")
    tl.store(logsumexp_ptr + row, tl.where(valid, lse, nan))
    tl.store(entropy_ptr + row, tl.where(valid, log_s - wmean, nan))
    tl.store(varentropy_ptr + row, tl.where(valid, wvar, nan))
    certainty = log_s - _scaled_half_gap(half_gap_mean, inv_t) - tl.log(tl.maximum(n, 1).to(tl.float32))
    tl.store(self_certainty_ptr + row, tl.where(valid, certainty, nan))
    tl.store(max_logprob_ptr + row, tl.where(valid, -log_s, nan))
    tl.store(argmax_ptr + row, tl.where(valid, argmax, -1).to(tl.int64))
    if HAS_TOKEN:
        token = tl.load(token_ptr + row)
        in_range = (token >= 0) & (token < vocab)
        x_token = _load_f32(row_ptr + tl.where(in_range, token, 0), True, 0.0)
        token_gap = _scaled_half_gap(0.5 * x_token - 0.5 * max_x, inv_t)
        tl.store(token_logprob_ptr + row, tl.where(valid & in_range, token_gap - log_s, nan))
    if WITH_TOPK:
        keep = tl.minimum(topk, n)
        positions = tl.arange(0, TOPK_PAD)
        ranked = tl.sort(top, descending=True)
        # Gaps to the max in float64: 64 of them of up to 2 * FLT_MAX (once per row).
        gaps = ranked.to(tl.float64) - max_x.to(tl.float64)
        mean_gap = tl.sum(tl.where(positions < keep, gaps, 0.0), axis=0) / tl.maximum(keep, 1).to(tl.float64)
        confidence = (log_s.to(tl.float64) - mean_gap * inv_t.to(tl.float64)).to(tl.float32)
        tl.store(topk_confidence_ptr + row, tl.where(valid, confidence, nan))


@triton.jit
def _row_pointer(logits_ptr, row, inner_size, outer_stride, inner_stride):
    return logits_ptr + (row // inner_size) * outer_stride + (row % inner_size) * inner_stride


@triton.jit
def _row_temperature(temperature_ptr, temperature, row, HAS_TEMPERATURE: tl.constexpr):
    if HAS_TEMPERATURE:
        t = tl.load(temperature_ptr + row)
    else:
        t = temperature
    return t


@triton.jit
def _row_kernel(logits_ptr, inner_size, outer_stride, inner_stride, vocab, temperature_ptr, temperature, token_ptr,
                topk, logsumexp_ptr, entropy_ptr, varentropy_ptr, self_certainty_ptr, max_logprob_ptr, argmax_ptr,
                token_logprob_ptr, topk_confidence_ptr, HAS_TEMPERATURE: tl.constexpr, HAS_TOKEN: tl.constexpr,
                WITH_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_pointer(logits_ptr, row, inner_size, outer_stride, inner_stride)
    t = _row_temperature(temperature_ptr, temperature, row, HAS_TEMPERATURE)
    inv_t = 1.0 / t
    running_max, weight, mean2, var2, half_gap_mean, n, argmax, top = _accumulate(
        row_ptr, 0, vocab, inv_t * LOG2E, inv_t, BLOCK, WITH_TOPK, TOPK_PAD)
    _ref, sum_exp, wmean, wvar = _to_state(running_max, weight, mean2, var2, inv_t)
    _finalize_store(row, row_ptr, vocab, t, inv_t, running_max, sum_exp, wmean, wvar, half_gap_mean, n, argmax, top,
                    topk, token_ptr, logsumexp_ptr, entropy_ptr, varentropy_ptr, self_certainty_ptr, max_logprob_ptr,
                    argmax_ptr, token_logprob_ptr, topk_confidence_ptr, HAS_TOKEN, WITH_TOPK, TOPK_PAD)


@triton.jit
def _partial_kernel(logits_ptr, inner_size, outer_stride, inner_stride, vocab, temperature_ptr, temperature,
                    slice_len, splits, state_ptr, count_ptr, argmax_ws_ptr, top_ws_ptr,
                    HAS_TEMPERATURE: tl.constexpr, WITH_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Program (row, split) reduces vocab[split * slice_len, ...) to a mergeable state."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = _row_pointer(logits_ptr, row, inner_size, outer_stride, inner_stride)
    t = _row_temperature(temperature_ptr, temperature, row, HAS_TEMPERATURE)
    inv_t = 1.0 / t
    start, end = slice_bounds(split, slice_len, vocab)
    running_max, weight, mean2, var2, half_gap_mean, n, argmax, top = _accumulate(
        row_ptr, start, end, inv_t * LOG2E, inv_t, BLOCK, WITH_TOPK, TOPK_PAD)
    ref, sum_exp, wmean, wvar = _to_state(running_max, weight, mean2, var2, inv_t)
    slot = row * splits + split
    state = state_ptr + slot * STATE_FLOATS
    tl.store(state + STATE_REF, ref)
    tl.store(state + STATE_SUM_EXP, sum_exp)
    tl.store(state + STATE_WMEAN, wmean)
    tl.store(state + STATE_WVAR, wvar)
    tl.store(state + STATE_HALF_GAP_MEAN, half_gap_mean)
    tl.store(state + STATE_MAX_X, running_max)
    tl.store(count_ptr + slot, n)
    tl.store(argmax_ws_ptr + slot, argmax)
    if WITH_TOPK:
        tl.store(top_ws_ptr + slot * TOPK_PAD + tl.arange(0, TOPK_PAD), top)


@triton.jit
def _merge_kernel(logits_ptr, inner_size, outer_stride, inner_stride, vocab, temperature_ptr, temperature, token_ptr,
                  topk, splits, state_ptr, count_ptr, argmax_ws_ptr, top_ws_ptr, logsumexp_ptr, entropy_ptr,
                  varentropy_ptr, self_certainty_ptr, max_logprob_ptr, argmax_ptr, token_logprob_ptr,
                  topk_confidence_ptr, HAS_TEMPERATURE: tl.constexpr, HAS_TOKEN: tl.constexpr,
                  WITH_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per row merges its slices' states (Chan's formula over the slices)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_pointer(logits_ptr, row, inner_size, outer_stride, inner_stride)
    t = _row_temperature(temperature_ptr, temperature, row, HAS_TEMPERATURE)
    inv_t = 1.0 / t
    s = tl.arange(0, SPLITS_PAD)
    in_row = s < splits
    slot = row * splits + s
    n_s = tl.load(count_ptr + slot, mask=in_row, other=0)
    used = n_s > 0
    sum_exp_s = load_state_field(state_ptr, slot, STATE_SUM_EXP, used, 0.0)
    wmean_s = load_state_field(state_ptr, slot, STATE_WMEAN, used, 0.0)
    wvar_s = load_state_field(state_ptr, slot, STATE_WVAR, used, 0.0)
    half_gap_mean_s = load_state_field(state_ptr, slot, STATE_HALF_GAP_MEAN, used, 0.0)
    max_x_s = load_state_field(state_ptr, slot, STATE_MAX_X, used, -float("inf"))
    argmax_s = tl.load(argmax_ws_ptr + slot, mask=used, other=2147483647)

    # Shifts between the slices' maxima as in merge_states (stats_state.h): far slices weigh 0.
    max_x = tl.max(max_x_s, axis=0)
    shift = tl.where(used, _merge_shift(max_x_s, max_x, inv_t), 0.0)
    weight_s = tl.where(used, sum_exp_s * tl.exp(shift), 0.0)
    sum_exp = tl.sum(weight_s, axis=0)
    mean_s = wmean_s + shift
    wmean = tl.sum(weight_s * mean_s, axis=0) / sum_exp
    centred = mean_s - wmean
    wvar = tl.sum(weight_s * (wvar_s + centred * centred), axis=0) / sum_exp
    n = tl.sum(n_s, axis=0)
    share = n_s.to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
    half_gap_mean = tl.sum(tl.where(used, share * (half_gap_mean_s + (0.5 * max_x_s - 0.5 * max_x)), 0.0), axis=0)
    argmax = tl.min(tl.where(used & (max_x_s == max_x), argmax_s, 2147483647), axis=0)
    if WITH_TOPK:
        candidates = tl.load(top_ws_ptr + slot[:, None] * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :],
                             mask=in_row[:, None], other=-float("inf"))
        top = _topk_absorb(tl.full([TOPK_PAD], -float("inf"), dtype=tl.float32),
                           tl.reshape(candidates, [SPLITS_PAD * TOPK_PAD]), SPLITS_PAD * TOPK_PAD, TOPK_PAD)
    else:
        top = tl.full([TOPK_PAD], -float("inf"), dtype=tl.float32)
    _finalize_store(row, row_ptr, vocab, t, inv_t, max_x, sum_exp, wmean, wvar, half_gap_mean, n, argmax, top, topk,
                    token_ptr, logsumexp_ptr, entropy_ptr, varentropy_ptr, self_certainty_ptr, max_logprob_ptr,
                    argmax_ptr, token_logprob_ptr, topk_confidence_ptr, HAS_TOKEN, WITH_TOPK, TOPK_PAD)


# ----------------------------------------------------------------------------------------------
# Launcher


def _block_size(vocab, element_size):
    cap = 4096 if element_size <= 2 else 2048
    return max(128, min(cap, triton.next_power_of_2(vocab)))


def choose_splits(rows, vocab, block, sm_count):
    """Programs per row: one when rows fill the GPU, else enough whole-block slices for ~4 per SM."""
    # 2 x SMs here, 4 x SMs in the CUDA launcher: no measurement chose either (see choose_splits in logit_stats.cuh).
    if rows >= 2 * sm_count:
        return 1
    by_target = -(-4 * sm_count // rows)
    by_work = max(1, vocab // block)
    return max(1, min(by_target, by_work))


def _output_pointers(outputs):
    """The output tensors (field name -> ``[rows]`` tensor, every field of LogitStats; an empty one
    for a field not asked for) as the kernels' ``<field>_ptr`` arguments."""
    return {f"{field}_ptr": tensor for field, tensor in outputs.items()}


def _launch_slices(logits, temperature, temperature_scalar, token_ids, topk, splits, slice_len, outputs):
    """Split path: ``splits`` programs per row over ``slice_len``-token slices, then the merge, into
    ``outputs``. Returns the (state, count, argmax, top) workspaces: verify_tree samples from the
    per-slice states."""
    import torch

    outer, inner, vocab = logits.shape
    rows = outer * inner
    block = _block_size(vocab, logits.element_size())
    with_topk = topk > 0
    topk_pad = triton.next_power_of_2(topk) if with_topk else 1
    slots = rows * splits
    f32 = dict(dtype=torch.float32, device=logits.device)
    state_ws = torch.empty((max(slots, 1) * STATE_FLOATS,), **f32)
    count_ws = torch.empty((max(slots, 1),), dtype=torch.int32, device=logits.device)
    argmax_ws = torch.empty((max(slots, 1),), dtype=torch.int32, device=logits.device)
    top_ws = torch.empty((slots * topk_pad if with_topk else 1,), **f32)
    workspace = (state_ws, count_ws, argmax_ws, top_ws)
    if rows == 0:
        return workspace
    temperature_arg = temperature if temperature is not None else outputs["logsumexp"]
    token_arg = token_ids if token_ids is not None else outputs["argmax"]
    strides = (inner, logits.stride(0), logits.stride(1), vocab)
    flags = dict(HAS_TEMPERATURE=temperature is not None, WITH_TOPK=with_topk, TOPK_PAD=topk_pad)
    _partial_kernel[(rows, splits)](
        logits, *strides, temperature_arg, float(temperature_scalar), slice_len, splits, state_ws, count_ws,
        argmax_ws, top_ws, BLOCK=block, num_warps=8 if block >= 2048 else 4, **flags)
    _merge_kernel[(rows,)](
        logits, *strides, temperature_arg, float(temperature_scalar), token_arg, int(topk), splits, state_ws,
        count_ws, argmax_ws, top_ws, **_output_pointers(outputs), HAS_TOKEN=token_ids is not None,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4, **flags)
    return workspace


def logit_stats_triton(logits, temperature, temperature_scalar, token_ids, topk, outputs, splits=None, sm_count=None):
    """Run logit_stats on ``logits`` viewed as ``[outer, inner, V]`` (last dim contiguous) into
    ``outputs``: the op's fields by name, ``[rows]`` each (an empty tensor for a field not asked
    for), allocated by the caller (the op's ``allocate_outputs``: the kernels know no output table).

    ``temperature`` (float32 ``[rows]`` or None), ``token_ids`` (int64 ``[rows]`` or None) and ``topk``
    as in ``torch.ops.fusedecode.logit_stats``. ``splits`` forces the number of programs per row
    (tests use it to cover both paths on any size); ``sm_count`` overrides the device's
    multiprocessor count.
    """
    import torch

    outer, inner, vocab = logits.shape
    rows = outer * inner
    block = _block_size(vocab, logits.element_size())
    if splits is None:
        if sm_count is None:
            sm_count = (torch.cuda.get_device_properties(logits.device).multi_processor_count
                        if logits.is_cuda and rows else 4)
        splits = choose_splits(max(rows, 1), vocab, block, sm_count)
    slice_len = block * -(-vocab // (splits * block))
    splits = -(-vocab // slice_len)
    if splits > 1:
        _launch_slices(logits, temperature, temperature_scalar, token_ids, topk, splits, slice_len, outputs)
        return
    if rows == 0:
        return
    with_topk = topk > 0
    temperature_arg = temperature if temperature is not None else outputs["logsumexp"]
    token_arg = token_ids if token_ids is not None else outputs["argmax"]
    _row_kernel[(rows,)](
        logits, inner, logits.stride(0), logits.stride(1), vocab, temperature_arg, float(temperature_scalar),
        token_arg, int(topk), **_output_pointers(outputs), HAS_TEMPERATURE=temperature is not None,
        HAS_TOKEN=token_ids is not None, WITH_TOPK=with_topk, TOPK_PAD=triton.next_power_of_2(topk) if with_topk else 1,
        BLOCK=block, num_warps=8 if block >= 2048 else 4)
