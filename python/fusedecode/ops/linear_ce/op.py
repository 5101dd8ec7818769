"""``fusedecode.linear_cross_entropy_entropy``: lm_head + cross-entropy + last-row entropy, chunk by chunk.

The definitions are written once, in ``linear_cross_entropy_entropy``'s docstring below; the naive
oracle is ``reference.linear_cross_entropy_entropy_reference``; the output table is in
``contract.py``, the argument checks in ``checks.py``. Backends: ``torch`` and ``triton``
(``cpp`` and ``cuda`` are not implemented: named, they raise ``RuntimeError``), as custom ops with
autograd, ``fusedecode::linear_ce_forward`` and ``fusedecode::linear_ce_weight_grad`` (the chunk step
in plain torch) and their ``_triton`` twins (the chunk step in ``triton_kernels/linear_ce.py``). The
template of ``ops/logit_stats/`` (``ops/README.md``).

The fused op never holds the ``[T, V]`` logits. Rows go through in chunks: each chunk's logits are one
matmul, then one pass (a Triton kernel, or plain torch) computes the chunk's losses and overwrites
the logits with the cross-entropy gradient, which is immediately contracted with the weight (for
``hidden``/``delta``) and with the chunk's rows (for ``weight``). The backward then only scales these
precomputed gradients by the upstream ones, as Liger-Kernel's fused linear cross-entropy does. The
cross-entropy part and the entropy part are kept apart so that any mix ``a * ce + b * entropy``
(SRGen's corrective loss) gets exact gradients.

``z = (hidden + delta) @ weight.T + bias`` is evaluated as ``hidden @ weight.T + (delta @ weight.T + bias)``:
the second term is one ``[V]`` offset row per batch entry, and keeping it apart means a small float32
``delta`` is not rounded away by adding it to half-precision hidden states. The head's logit scale and
soft-capping (``fusedecode.head_transform``) act on each chunk's logits after the offset; their
derivative multiplies the logit gradients before they are contracted.
"""

import operator

import torch

from ...backends import resolve_backend, triton_import_error
from ...head_transform import check_head_transform, head_transform_slope
from .._outputs import allocate, by_name
from .._tiled_head import accumulate_dtype, default_chunk, head_chunks, head_offsets, matmul, transform_chunk
from .checks import check_linear_ce_args
from .contract import ACCUMULATE, BACKENDS, FORWARD_OUTPUTS, SCHEMAS

__all__ = ["linear_cross_entropy_entropy", "default_chunk"]

# ------------------------------------------------------------------------------------------------
# The public function


def linear_cross_entropy_entropy(hidden, weight, targets, *, delta=None, bias=None, logit_scale=None, softcap=None,
                                 temperature=1.0, ignore_index=-100, chunk=None, backend=None):
    """Mean cross-entropy of a language-model head over a context, and the entropy of its last row,
    without materialising the ``[T, V]`` logits (forward and backward).

    Per batch entry, with the logits of row ``t`` accumulated in float32 as a model's head makes them,
    each step only if its argument is given:

        z_t = (hidden_t + delta) @ weight.T + bias
        z_t = z_t * logit_scale
        z_t = softcap * tanh(z_t / softcap)

    and then

    - ``ce = mean over rows with targets_t != ignore_index of (logsumexp(z_t) - z_t[targets_t])``;
      ``0.0`` (gradient 0) when every row is ignored, e.g. SRGen's first step on a one-token prompt
    - ``entropy = -sum p log p`` with ``p = softmax(z_{T-1} / temperature)``: the last row (the
      current decoding step), whatever its target

    Gradients flow to ``hidden``, ``weight``, ``delta`` and ``bias`` (each only if it requires grad),
    exact for any upstream mix of ``ce`` and ``entropy``: ``dce/dz_t = (softmax(z_t) - onehot(targets_t)) / n``
    and ``dentropy/dz_{T-1} = -p (log p + entropy) / temperature``, times the transform's derivative
    ``logit_scale * (1 - (z / softcap)^2)``. NaN inputs give NaN outputs.

    Memory: ``chunk * V`` float32 logits at a time (twice that on the torch path with ``softcap``
    and a gradient, for the transform's derivative), plus float32 ``[B, T, H]`` when ``hidden``
    requires grad and ``[V, H]`` when ``weight`` does. With ``B > 1`` the weight gradient is computed
    in the backward by a second chunked pass, since each batch entry's upstream gradient weighs its
    share and keeping ``B`` separate ``[V, H]`` gradients would cost ``B`` times the weight.

    Args:
        hidden: float32/float16/bfloat16 ``[T, H]`` or ``[B, T, H]``: final hidden states (after the
            last norm, before lm_head). float64 runs on the torch backend.
        weight: ``[V, H]``, hidden's dtype (the lm_head weight).
        targets: int64 ``[T]`` / ``[B, T]``; rows equal to ``ignore_index`` are left out of ``ce``.
            Values outside ``[0, V)`` raise ``ValueError`` for CPU tensors; on a GPU (checking would
            synchronise) they make that entry's ``ce`` NaN.
        delta: optional ``[H]``, or ``[B, H]`` (one per batch entry), hidden's dtype or float32,
            added to every row of ``hidden``.
        bias: optional ``[V]``, the weight's dtype or float32: the lm_head bias (Phi).
        logit_scale: optional finite float multiplying the logits (Cohere's ``logit_scale``; Granite
            divides by ``logits_scaling``: pass its inverse).
        softcap: optional float > 0: final soft-capping (Gemma 2/3's ``final_logit_softcapping``).
        temperature: float > 0 with 1/T finite in float32 (about 3e-39 < T < 3.4e38), for the
            entropy only.
        ignore_index: target value of rows to leave out.
        chunk: rows per chunk; default keeps ``chunk * V`` float32 logits around 48 MiB.
        backend: None (``$FUSEDECODE_BACKEND`` or ``"auto"``), ``"auto"``, ``"triton"`` or
            ``"torch"``. ``auto`` is triton then torch for CUDA tensors and torch on CPU (and for
            float64). ``"cpp"``/``"cuda"`` are not implemented for this op: named, as the argument
            or by ``$FUSEDECODE_BACKEND``, they raise ``RuntimeError``, as for every op.

    Returns:
        ``(ce, entropy)``: float32 (float64 for float64 inputs) of shape ``[]``, or ``[B]`` when batched.

    Example::

        >>> import torch, fusedecode
        >>> hidden, weight = torch.eye(3)[:2], 2.0 * torch.eye(3)  # logits [2, 0, 0] and [0, 2, 0]
        >>> ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, torch.tensor([0, -100]))
        >>> round(ce.item(), 4), round(entropy.item(), 4)  # ce of row 0 only; entropy of row 1
        (0.2395, 0.6656)
    """
    check_linear_ce_args(hidden, weight, targets, delta, temperature, ignore_index, chunk)
    transform = check_head_transform(bias, logit_scale, softcap, weight)
    name = resolve_backend(backend, hidden.device, BACKENDS, hidden.dtype)

    batched = hidden.dim() == 3
    if not batched:
        hidden, targets = hidden.unsqueeze(0), targets.unsqueeze(0)
    if delta is not None:
        delta = delta.expand(hidden.shape[0], hidden.shape[2])
    chunk = operator.index(chunk) if chunk is not None else default_chunk(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and delta is not None and delta.requires_grad,
             grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    op = torch.ops.fusedecode.linear_ce_forward_triton if name == "triton" else torch.ops.fusedecode.linear_ce_forward
    results = op(hidden, weight, targets, delta, transform.bias, transform.logit_scale, transform.softcap,
                 float(temperature), operator.index(ignore_index), chunk, *needs)
    fields = by_name(FORWARD_OUTPUTS, results, _requested(hidden, *needs))
    ce, entropy = fields["ce"], fields["entropy"]
    if not batched:
        ce, entropy = ce.squeeze(0), entropy.squeeze(0)
    return ce, entropy


def _requested(hidden, need_hidden, need_delta, need_weight, need_bias):
    """Which gradient outputs the forward computes (the ``requested_by`` conditions of
    ``FORWARD_OUTPUTS``). With B > 1 the weight gradient is recomputed in the backward (see the
    public docstring)."""
    return {"need_hidden": need_hidden, "need_delta": need_delta, "weight_now": need_weight and hidden.shape[0] == 1,
            "need_bias": need_bias, "need_input": need_hidden or need_delta}


# ------------------------------------------------------------------------------------------------
# The chunked pass: the tiled head (ops/_tiled_head.py) shared with linear_logit_stats; the two
# backends differ only in the per-chunk step


def _chunk_step_torch(logits, offset, targets, scale, loss, entropy, entropy_grad, entropy_row, inv_temperature,
                      ignore_index, compute_grad, logit_scale, softcap):
    """One chunk in plain torch; the same contract as ``triton_kernels.linear_ce.chunk_step_triton``:
    adds ``offset`` (``[V]`` or None) to the chunk's logits ``z`` and applies the head transform,
    ``y = transform(z + offset)``; writes the rows' losses into ``loss``, the entropy row's entropy
    and its gradient with respect to ``z`` into ``entropy`` and ``entropy_grad`` (when
    ``entropy_row >= 0``), and with ``compute_grad`` overwrites ``logits`` with the cross-entropy
    gradient with respect to ``z``, ``scale * (softmax(y) - onehot) * dy/dz`` (0 on ignored rows,
    NaN on rows whose target is out of range). Without ``compute_grad`` the logits are left in an
    unspecified state."""
    transformed = logit_scale is not None or softcap is not None
    transform_chunk(logits, offset, logit_scale, softcap)
    if entropy_row >= 0:
        log_p = torch.log_softmax(logits[entropy_row] * inv_temperature, dim=-1)
        p = log_p.exp()
        row_entropy = -(p * log_p).sum()
        entropy.copy_(row_entropy)
        torch.mul(p * (log_p + row_entropy), -inv_temperature, out=entropy_grad)
        if transformed:
            entropy_grad.mul_(head_transform_slope(logits[entropy_row], logit_scale, softcap))
    # Taken before the softmax below overwrites the transformed logits (a second [rows, V] buffer
    # only with soft-capping).
    slope = head_transform_slope(logits, logit_scale, softcap) if compute_grad and transformed else None
    vocab = logits.shape[1]
    ignored = targets == ignore_index
    out_of_range = ~ignored & ((targets < 0) | (targets >= vocab))
    counted = ~ignored & ~out_of_range
    index = torch.where(counted, targets, 0).unsqueeze(1)
    target_logit = logits.gather(1, index).squeeze(1)
    # logsumexp and softmax in place, so that the chunk's logits are the only [rows, V] buffer.
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).exp_()
    sum_exp = logits.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    loss.copy_((lse - target_logit).masked_fill(ignored, 0.0).masked_fill(out_of_range, float("nan")))
    if compute_grad:
        logits.mul_(scale / sum_exp)
        logits.scatter_add_(1, index, -(counted.to(logits.dtype) * scale).unsqueeze(1))
        if slope is not None:
            logits.mul_(slope)
        # Selected rather than multiplied away: a NaN in an ignored row must not leak into the gradient.
        fill = torch.zeros_like(lse).masked_fill_(out_of_range, float("nan"))
        torch.where(counted.unsqueeze(1), logits, fill.unsqueeze(1), out=logits)


def _accumulate_dtype(hidden):
    return accumulate_dtype(hidden.dtype)


def _chunked_pass(hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, inv_temperature,
                  ignore_index, chunk, step, with_entropy, need_hidden, need_colsum, need_weight):
    """Walk every batch entry's rows ``chunk`` at a time, ``step`` (``_chunk_step_torch`` or
    ``triton_kernels.linear_ce.chunk_step_triton``) doing each chunk's losses and logit gradients.

    ``ce_scale`` ``[B]`` multiplies each entry's cross-entropy gradient (1/n in the forward; times the
    upstream gradient when the backward recomputes). Returns per-row losses ``[B, T]``, entropies
    ``[B]``, the entropy row's logit gradient ``[B, V]``, and, when asked for, the cross-entropy
    gradient with respect to the logits (before the head transform) contracted three ways: with the
    weight per row (``[B, T, H]``), summed over rows (``[B, V]``, which ``delta`` and ``bias`` need),
    and with the rows for the weight (``[V, H]``, the ``hidden`` part only: the ``delta`` part is
    ``colsum.T @ delta``, added by the caller).
    """
    batch, tokens, width = hidden.shape
    vocab = weight.shape[0]
    accumulate = _accumulate_dtype(hidden)
    options = dict(dtype=accumulate, device=hidden.device)
    compute_grad = need_hidden or need_colsum or need_weight
    offset = head_offsets(weight, delta, bias, accumulate)
    targets = targets.contiguous()
    row_loss = torch.empty((batch, tokens), **options)
    entropy = torch.full((batch,), float("nan"), **options)
    entropy_grad = torch.zeros((batch, vocab), **options)
    grad_hidden = torch.empty((batch, tokens, width), **options) if need_hidden else None
    colsum = torch.zeros((batch, vocab), **options) if need_colsum else None
    grad_weight = torch.zeros((vocab, width), **options) if need_weight else None
    for b in range(batch):
        row_offset = offset[b] if offset is not None and offset.dim() == 2 else offset
        for start, stop, logits in head_chunks(hidden[b], weight, chunk, accumulate):
            rows = hidden[b, start:stop]
            entropy_row = tokens - 1 - start if with_entropy and stop == tokens else -1
            step(logits, row_offset, targets[b, start:stop], ce_scale[b:b + 1], row_loss[b, start:stop],
                 entropy[b:b + 1], entropy_grad[b], entropy_row, inv_temperature, ignore_index, compute_grad,
                 logit_scale, softcap)
            if need_hidden:
                grad_hidden[b, start:stop] = matmul(logits, weight, accumulate)
            if need_colsum:
                colsum[b] += logits.sum(0)
            if need_weight:
                # Ignored rows have zero gradient, but 0 * NaN is NaN: a NaN in an ignored row (padding)
                # must not reach the weight gradient, so those rows are zeroed, not multiplied away.
                ignored = (targets[b, start:stop] == ignore_index).unsqueeze(1)
                grad_weight += matmul(logits.T, rows.masked_fill(ignored, 0), accumulate)
            del logits  # before the next chunk's logits are allocated
    return row_loss, entropy, entropy_grad, grad_hidden, colsum, grad_weight


def _ce_scale(targets, ignore_index, accumulate):
    """1 / (rows counted) per batch entry; 1 where none is, which makes that entry's ce and gradient 0."""
    counted = (targets != ignore_index).sum(-1)
    return 1.0 / counted.clamp_min(1).to(accumulate)


def _forward(hidden, weight, targets, delta, bias, logit_scale, softcap, temperature, ignore_index, chunk, step,
             need_hidden, need_delta, need_weight, need_bias):
    """The forward op's outputs by name (None where not requested)."""
    accumulate = _accumulate_dtype(hidden)
    ce_scale = _ce_scale(targets, ignore_index, accumulate)
    requested = _requested(hidden, need_hidden, need_delta, need_weight, need_bias)
    weight_now = requested["weight_now"]
    need_colsum = need_delta or need_bias or (weight_now and delta is not None)
    row_loss, entropy, entropy_grad, grad_hidden, colsum, grad_weight = _chunked_pass(
        hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, 1.0 / temperature, ignore_index, chunk,
        step, True, need_hidden, need_colsum, weight_now)
    if weight_now and delta is not None:
        grad_weight += matmul(colsum.T, delta, accumulate)
    return dict(
        ce=row_loss.sum(-1) * ce_scale, entropy=entropy, ce_scale=ce_scale, grad_hidden_ce=grad_hidden,
        grad_delta_ce=matmul(colsum, weight, accumulate) if need_delta else None,
        grad_weight_ce=grad_weight,
        grad_bias_ce=colsum if need_bias else None,  # dz/dbias is the identity: the row sums themselves
        entropy_grad_logits=entropy_grad,
        entropy_grad_hidden=matmul(entropy_grad, weight, accumulate) if requested["need_input"] else None)


def _weight_grad(hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, ignore_index, chunk, step):
    """The cross-entropy part of the weight gradient, ``ce_scale[b]`` weighing entry b: a second
    chunked pass (the backward of batched inputs)."""
    _, _, _, _, colsum, grad_weight = _chunked_pass(
        hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, 1.0, ignore_index, chunk, step,
        False, False, delta is not None, True)
    if delta is not None:
        grad_weight += matmul(colsum.T, delta, grad_weight.dtype)
    return grad_weight


def _backward(ctx, grad_ce, grad_entropy, weight_grad_op):
    (logit_scale, softcap, ignore_index, chunk, need_hidden, need_delta, need_weight, need_bias, has_delta) = ctx.flags
    (hidden, weight, targets, delta, bias, ce_scale, grad_hidden_ce, grad_delta_ce, grad_weight_ce, grad_bias_ce,
     entropy_grad, entropy_grad_hidden) = ctx.saved_tensors
    accumulate = ce_scale.dtype
    upstream_ce, upstream_entropy = grad_ce.to(accumulate), grad_entropy.to(accumulate)
    grad_hidden = grad_delta = grad_weight = grad_bias = None
    if need_hidden:
        grad_hidden = grad_hidden_ce * upstream_ce.view(-1, 1, 1)
        grad_hidden[:, -1] += upstream_entropy.unsqueeze(1) * entropy_grad_hidden
        grad_hidden = grad_hidden.to(hidden.dtype)
    if need_delta:
        grad_delta = upstream_ce.unsqueeze(1) * grad_delta_ce + upstream_entropy.unsqueeze(1) * entropy_grad_hidden
        grad_delta = grad_delta.to(delta.dtype)
    if need_bias:
        grad_bias = (upstream_ce.unsqueeze(1) * grad_bias_ce + upstream_entropy.unsqueeze(1) * entropy_grad).sum(0)
        grad_bias = grad_bias.to(bias.dtype)
    if need_weight:
        if hidden.shape[0] == 1:
            grad_weight = grad_weight_ce * upstream_ce
        else:
            grad_weight = weight_grad_op(hidden, weight, targets, delta, bias, logit_scale, softcap,
                                         ce_scale * upstream_ce, ignore_index, chunk)
        last_rows = hidden[:, -1].to(accumulate)
        if has_delta:
            last_rows = last_rows + delta.to(accumulate)
        grad_weight = grad_weight + (upstream_entropy.unsqueeze(1) * entropy_grad).T @ last_rows
        grad_weight = grad_weight.to(weight.dtype)
    return (grad_hidden, grad_weight, None, grad_delta, grad_bias) + (None,) * 9


def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, delta, bias, logit_scale, softcap, _, ignore_index, chunk, need_hidden, need_delta,
     need_weight, need_bias) = inputs
    ctx.flags = (logit_scale, softcap, ignore_index, chunk, need_hidden, need_delta, need_weight, need_bias,
                 delta is not None)
    saved = by_name(FORWARD_OUTPUTS, output)
    ctx.save_for_backward(hidden, weight, targets, delta, bias, *(saved[name] for name in (
        "ce_scale", "grad_hidden_ce", "grad_delta_ce", "grad_weight_ce", "grad_bias_ce", "entropy_grad_logits",
        "entropy_grad_hidden")))


# ------------------------------------------------------------------------------------------------
# Custom ops: forward (with autograd) and weight gradient, once per backend's chunk step


def _forward_fake(hidden, weight, targets, delta, bias, logit_scale, softcap, temperature, ignore_index, chunk,
                  need_hidden, need_delta, need_weight, need_bias):
    batch, tokens, width = hidden.shape
    sizes = {"batch": batch, "tokens": tokens, "width": width, "vocab": weight.shape[0]}
    requested = _requested(hidden, need_hidden, need_delta, need_weight, need_bias)
    return tuple(allocate(FORWARD_OUTPUTS, hidden, sizes, requested, {ACCUMULATE: _accumulate_dtype(hidden)}).values())


def _weight_grad_fake(hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, ignore_index, chunk):
    return weight.new_empty(weight.shape, dtype=_accumulate_dtype(hidden))


def _register_backend(forward_name, weight_grad_name, step):
    def run_forward(hidden, weight, targets, delta, bias, logit_scale, softcap, temperature, ignore_index, chunk,
                    need_hidden, need_delta, need_weight, need_bias):
        fields = _forward(hidden, weight, targets, delta, bias, logit_scale, softcap, temperature, ignore_index,
                          chunk, step, need_hidden, need_delta, need_weight, need_bias)
        # A custom op's outputs may not alias each other: one fresh empty tensor per output not computed.
        accumulate = _accumulate_dtype(hidden)
        return tuple(fields[output.name] if fields[output.name] is not None
                     else hidden.new_empty((0,), dtype=accumulate) for output in FORWARD_OUTPUTS)

    def run_weight_grad(hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, ignore_index, chunk):
        return _weight_grad(hidden, weight, targets, delta, bias, logit_scale, softcap, ce_scale, ignore_index, chunk,
                            step)

    forward = torch.library.custom_op(f"fusedecode::{forward_name}", run_forward, mutates_args=(),
                                      schema=SCHEMAS[forward_name])
    forward.register_fake(_forward_fake)
    weight_grad = torch.library.custom_op(f"fusedecode::{weight_grad_name}", run_weight_grad, mutates_args=(),
                                          schema=SCHEMAS[weight_grad_name])
    weight_grad.register_fake(_weight_grad_fake)
    weight_grad_op = getattr(torch.ops.fusedecode, weight_grad_name)
    forward.register_autograd(lambda ctx, grad_ce, grad_entropy, *_: _backward(ctx, grad_ce, grad_entropy,
                                                                               weight_grad_op),
                              setup_context=_setup_context)


def _register_ops():
    _register_backend("linear_ce_forward", "linear_ce_weight_grad", _chunk_step_torch)
    if triton_import_error() is None:
        from ...triton_kernels.linear_ce import chunk_step_triton  # optional dependency: Triton

        _register_backend("linear_ce_forward_triton", "linear_ce_weight_grad_triton", chunk_step_triton)


_register_ops()
