"""Triton kernel of ``linear_cross_entropy_entropy``: one chunk of logits to losses and logit gradients.

The chunk's float32 logits ``z`` ([rows, V], contiguous) come from a torch matmul; one program per
row then computes, with ``offset`` the optional ``delta @ W^T + bias`` row, ``f`` the head transform
(``triton_kernels.head_transform``: scale, then soft-capping), ``t`` the row's target and ``s`` the
chunk's cross-entropy gradient scale (1/n, times the upstream gradient when the backward
recomputes):

    x        = f(z + offset)                  f' = df/dz there
    lse      = m + log S                      m = max x, S = sum exp(x - m)    (one online pass)
    loss     = lse - x_t                      0 if t == ignore_index, NaN if t outside [0, V)
    dCE/dz_i = s * (exp(x_i - lse) - [i == t]) * f'_i                          (written over z in place)

and for the entropy row only (the batch entry's last row), before the logits are overwritten, with
``y = x / T``:

    H        = log S_y - W_y / S_y            m_y = max y, S_y = sum exp(y - m_y),
                                              W_y = sum exp(y - m_y) (y - m_y)  (one online pass)
    dH/dz_i  = -(1/T) p_i (log p_i + H) f'_i  log p_i = y_i - m_y - log S_y, into a separate [V] buffer

The online pass keeps one running max per program and rescales ``S`` and ``W`` when a block raises
it: ``S' = a S`` and ``W' = a (W + (m - m') S)`` with ``a = exp(m - m')``. Ignored rows get zero
gradients (selected, not multiplied, so that a NaN there stays out); NaN anywhere else in a row
makes its loss and gradient NaN. Row offsets are int64. The transform's recomputation in each pass
is cheaper than a second ``[rows, V]`` buffer of transformed logits.
"""

import triton
import triton.language as tl

from .head_transform import apply_head_transform

# The largest block of logits a program loads at once (fp32): large enough for full-width loads,
# small enough to keep registers free. Tests lower it to exercise many blocks on small vocabularies.
MAX_BLOCK = 2048


@triton.jit
def _load_row(row_ptr, offset_ptr, index, vocab, logit_scale, softcap, HAS_OFFSET: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """``(x, f')`` of the lanes ``index``; padding lanes are -inf in ``x`` (masked after the
    transform, which would map them to a finite -softcap, or to +inf with a negative scale)."""
    inside = index < vocab
    z = tl.load(row_ptr + index, mask=inside, other=0.0)
    if HAS_OFFSET:
        z += tl.load(offset_ptr + index, mask=inside, other=0.0)
    x, slope = apply_head_transform(z, logit_scale, softcap, SOFTCAP)
    return tl.where(inside, x, -float("inf")), slope


@triton.jit
def _softmax_stats(row_ptr, offset_ptr, vocab, inv_temperature, logit_scale, softcap, HAS_OFFSET: tl.constexpr,
                   SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """(m, S, W) of y = x * inv_temperature over the row (see the module docstring)."""
    lanes = tl.arange(0, BLOCK)
    m = -float("inf")
    s = 0.0
    w = 0.0
    for start in range(0, vocab, BLOCK):
        index = start + lanes
        x, _ = _load_row(row_ptr, offset_ptr, index, vocab, logit_scale, softcap, HAS_OFFSET, SOFTCAP)
        y = x * inv_temperature
        new_m = tl.maximum(m, tl.max(y, axis=0))
        rescale = tl.exp(m - new_m)
        started = s != 0.0  # also true for NaN, which must stay NaN
        shift = tl.where(started, m - new_m, 0.0)  # m is -inf before the first block
        w = rescale * (w + shift * s)
        s = s * rescale
        e = tl.exp(y - new_m)
        s += tl.sum(e, axis=0)
        w += tl.sum(tl.where(index < vocab, e * (y - new_m), 0.0), axis=0)
        m = new_m
    return m, s, w


@triton.jit
def _chunk_kernel(logits_ptr, offset_ptr, targets_ptr, scale_ptr, loss_ptr, entropy_ptr, entropy_grad_ptr, vocab,
                  ignore_index, entropy_row, inv_temperature, logit_scale, softcap, HAS_OFFSET: tl.constexpr,
                  SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of the chunk."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * vocab
    lanes = tl.arange(0, BLOCK)

    if row == entropy_row:
        m_y, s_y, w_y = _softmax_stats(row_ptr, offset_ptr, vocab, inv_temperature, logit_scale, softcap, HAS_OFFSET,
                                       SOFTCAP, BLOCK)
        log_s_y = tl.log(s_y)
        entropy = log_s_y - w_y / s_y
        tl.store(entropy_ptr, entropy)
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            x, slope = _load_row(row_ptr, offset_ptr, index, vocab, logit_scale, softcap, HAS_OFFSET, SOFTCAP)
            log_p = tl.where(index < vocab, x * inv_temperature - m_y - log_s_y, 0.0)  # padding lanes: -inf * 0
            grad = -inv_temperature * tl.exp(log_p) * (log_p + entropy) * slope
            tl.store(entropy_grad_ptr + index, grad, mask=index < vocab)

    m, s, _ = _softmax_stats(row_ptr, offset_ptr, vocab, 1.0, logit_scale, softcap, HAS_OFFSET, SOFTCAP, BLOCK)
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe_target = tl.where(in_range, target, 0)
    x_target, _ = _load_row(row_ptr, offset_ptr, safe_target, vocab, logit_scale, softcap, HAS_OFFSET, SOFTCAP)
    loss = tl.where(in_range, lse - x_target, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr)
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            x, slope = _load_row(row_ptr, offset_ptr, index, vocab, logit_scale, softcap, HAS_OFFSET, SOFTCAP)
            p = tl.exp(x - lse)
            grad = tl.where(index == target, p - 1.0, p) * scale * slope
            grad = tl.where(in_range, grad, float("nan"))
            tl.store(row_ptr + index, tl.where(ignored, 0.0, grad), mask=index < vocab)


def chunk_step_triton(logits, offset, targets, scale, loss, entropy, entropy_grad, entropy_row, inv_temperature,
                      ignore_index, compute_grad, logit_scale, softcap):
    """Run ``_chunk_kernel`` on one chunk (the contract of ``fusedecode.linear_ce._chunk_step_torch``).

    ``logits`` float32 ``[rows, V]`` contiguous (overwritten with the CE gradient when
    ``compute_grad``), ``offset`` float32 ``[V]`` contiguous or None, ``targets`` int64 ``[rows]``,
    ``scale`` float32 ``[1]``, ``loss`` float32 ``[rows]``, ``entropy`` float32 ``[1]`` and
    ``entropy_grad`` float32 ``[V]`` (written when ``0 <= entropy_row < rows``); ``logit_scale``
    and ``softcap`` floats or None.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    _chunk_kernel[(rows,)](
        logits, offset if offset is not None else logits, targets, scale, loss, entropy, entropy_grad, vocab,
        int(ignore_index), int(entropy_row), float(inv_temperature), 1.0 if logit_scale is None else float(logit_scale),
        1.0 if softcap is None else float(softcap), HAS_OFFSET=offset is not None, SOFTCAP=softcap is not None,
        COMPUTE_GRAD=bool(compute_grad), BLOCK=block, num_warps=8 if block >= 2048 else 4)
