"""``fusedecode.logit_stats``: per-row uncertainty statistics of logits in one pass.

The definitions are written once, in ``logit_stats``'s docstring below; every backend and comment
refers here. Backends: ``torch`` (``reference.logit_stats_reference``, the oracle), ``cpp`` and
``cuda`` (the native op ``fusedecode::logit_stats``: schema in ``csrc/ops.cpp``, outputs in
``csrc/logit_stats_op.h``, kernels in ``csrc/cpu/logit_stats_cpu.cpp`` and
``csrc/include/fusedecode/logit_stats.cuh``), ``triton`` (``fusedecode::logit_stats_triton``,
kernels in ``triton_kernels/logit_stats.py``). The output table is in ``contract.py``, the argument
checks in ``checks.py``. This slice is the template every op follows (``ops/README.md``).
"""

import operator

import torch

from ... import _native
from ...backends import resolve_backend, triton_import_error
from .._outputs import allocate, by_name
from .checks import check_logit_stats_args
from .contract import BACKENDS, OUTPUTS, SCHEMAS, LogitStats, requested_outputs
from .reference import logit_stats_backward, logit_stats_reference

__all__ = ["logit_stats", "temperature_arguments", "allocate_outputs", "run_triton"]

# ------------------------------------------------------------------------------------------------
# The public function


def logit_stats(logits, *, temperature=1.0, token_ids=None, topk=0, backend=None):
    """Entropy, varentropy, self-certainty, log-sum-exp, top-1 log-prob, argmax and DeepConf
    confidence of every row of ``logits``, reading the logits once.

    Per row, ``z = logits.float() / temperature``; entries equal to -inf are masked (probability 0)
    and ``p = softmax(z)`` over the finite ones (``n`` of them):

    - ``logsumexp = log sum exp z``; ``entropy = -sum p log p``;
      ``varentropy = sum p (log p + entropy)^2``
    - ``self_certainty = KL(uniform || p) = logsumexp - mean(z) - log n``
    - ``max_logprob = max z - logsumexp``; ``argmax`` (ties to the lowest index)
    - ``token_logprob = z[token_ids] - logsumexp`` (when ``token_ids`` is given; -inf if masked)
    - ``topk_confidence = -(1/k) sum of the k largest log p`` (when ``topk`` in 1..64; k > n uses n)

    A row with NaN or +inf, or with no finite entry, gives NaN in every float field and -1 as argmax.

    Args:
        logits: float32/float16/bfloat16 tensor ``[..., V]``; last dim contiguous, other strides free.
        temperature: float, or a float tensor of shape ``[...]`` (one per row), finite and > 0 with
            1/T finite in float32 (about 3e-39 < T < 3.4e38; checked in float32, as the kernels
            compute). Every finite logit is a token however negative (-1e20, finfo.min masking):
            all fields are computed relative to the row maximum, exact at any magnitude.
        token_ids: optional int32/int64 tensor ``[...]``.
        topk: 0 (off) or 1..64.
        backend: None (``$FUSEDECODE_BACKEND`` or ``"auto"``), ``"cuda"``, ``"triton"``, ``"cpp"``,
            ``"torch"``.

    Returns:
        ``LogitStats`` of tensors shaped ``[...]`` on the logits' device (float32, argmax int64).

    Example::

        >>> import torch, fusedecode
        >>> stats = fusedecode.logit_stats(torch.tensor([[2.0, 1.0, 0.0]]), topk=2)
        >>> stats.argmax
        tensor([0])
        >>> round(stats.entropy.item(), 4)
        0.8324
    """
    check_logit_stats_args(logits, temperature, token_ids, topk)
    topk = operator.index(topk)
    name = resolve_backend(backend, logits.device, BACKENDS)
    if name == "torch":
        if not _needs_grad(logits, temperature):
            return logit_stats_reference(logits, temperature, token_ids, topk)
        return LogitStats(*_TorchBackendWithGrad.apply(logits, temperature, token_ids, topk, torch.float32))

    temperature_rows, temperature_scalar = temperature_arguments(temperature)
    token_rows = token_ids.reshape(-1).to(torch.int64).contiguous() if token_ids is not None else None
    op = torch.ops.fusedecode.logit_stats_triton if name == "triton" else torch.ops.fusedecode.logit_stats
    results = op(_as_rows_3d(logits), temperature_rows, temperature_scalar, token_rows, topk)
    fields = by_name(OUTPUTS, results, requested_outputs(token_ids, topk))
    rows_shape = logits.shape[:-1]
    if len(rows_shape) != 1:  # the ops return one entry per row: [rows]
        fields = {field: value.view(rows_shape) if value is not None else None for field, value in fields.items()}
    return LogitStats(**fields)


# ------------------------------------------------------------------------------------------------
# Gradients: every backend's backward is ``reference.logit_stats_backward``


def _needs_grad(logits, temperature):
    return torch.is_grad_enabled() and (logits.requires_grad or (
        isinstance(temperature, torch.Tensor) and temperature.requires_grad))


def _float_grads(outputs, grads, rows):
    """The incoming gradients of the float outputs that were computed, by name (argmax has none; an
    optional output that was not asked for is an empty placeholder)."""
    return {output.name: grad for output, grad in zip(outputs, grads)
            if output.dtype == torch.float32 and grad is not None and grad.numel() == rows and grad.numel()}


class _TorchBackendWithGrad(torch.autograd.Function):
    """The torch backend when a gradient is wanted: the reference, with ``logit_stats_backward`` as
    its backward, as the fused ops have it (plain autograd through the reference would give the
    rows whose statistics are NaN a zero gradient instead of NaN)."""

    @staticmethod
    def forward(ctx, logits, temperature, token_ids, topk, dtype):
        stats = logit_stats_reference(logits, temperature, token_ids, topk, dtype)
        is_tensor = isinstance(temperature, torch.Tensor)
        ctx.save_for_backward(logits, temperature if is_tensor else None, token_ids)
        ctx.temperature_scalar, ctx.topk = None if is_tensor else temperature, topk
        ctx.mark_non_differentiable(stats.argmax)
        return tuple(stats)

    @staticmethod
    def backward(ctx, *grads):
        logits, temperature, token_ids = ctx.saved_tensors
        temperature = temperature if temperature is not None else ctx.temperature_scalar
        grad_logits, grad_temperature = logit_stats_backward(
            logits, temperature, token_ids, ctx.topk, _float_grads(OUTPUTS, grads, logits.numel() // logits.shape[-1]),
            temperature_grad=ctx.needs_input_grad[1])
        return grad_logits, grad_temperature, None, None, None


def _setup_context(ctx, inputs, output):
    logits, temperature, temperature_scalar, token_ids, topk = inputs
    ctx.save_for_backward(logits, temperature, token_ids)
    ctx.temperature_scalar, ctx.topk = temperature_scalar, topk


def _backward(ctx, *grads):
    """The custom ops' backward: the logits arrive as ``[outer, inner, V]``, the rest per row ``[rows]``."""
    logits, temperature, token_ids = ctx.saved_tensors
    rows_2d = logits.reshape(-1, logits.shape[-1])
    grad_logits, grad_temperature = logit_stats_backward(
        rows_2d, temperature if temperature is not None else ctx.temperature_scalar, token_ids, ctx.topk,
        _float_grads(OUTPUTS, grads, rows_2d.shape[0]), temperature_grad=ctx.needs_input_grad[1])
    return grad_logits.view(logits.shape), grad_temperature, None, None, None


# ------------------------------------------------------------------------------------------------
# From the public arguments to the custom ops' arguments


def temperature_arguments(temperature):
    """(per-row float32 temperatures ``[rows]`` or None, the scalar temperature)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(-1).to(torch.float32).contiguous(), 1.0
    return None, float(temperature)


def _as_rows_3d(logits):
    """View ``[..., V]`` as ``[outer, inner, V]`` without copying when the leading dims allow it.

    Leading dims collapse into at most two (size, stride) groups; a layout needing three or more
    (rare: e.g. a permuted 4-D tensor) is copied to contiguous memory.
    """
    vocab = logits.shape[-1]
    if logits.dim() == 2:  # the common [B, V] case, any row stride
        rows, row_stride = logits.shape[0], logits.stride(0)
        return logits.as_strided((1, rows, vocab), (rows * max(row_stride, 1), row_stride, 1))
    groups = []  # (size, stride), innermost first
    for size, stride in zip(reversed(logits.shape[:-1]), reversed(logits.stride()[:-1])):
        if size == 1:
            continue
        if groups and groups[-1][1] * groups[-1][0] == stride:
            groups[-1] = (groups[-1][0] * size, groups[-1][1])
        else:
            groups.append((size, stride))
    if len(groups) > 2:
        logits = logits.contiguous()
        rows = logits.numel() // vocab
        return logits.view(1, rows, vocab)
    (inner, inner_stride), (outer, outer_stride) = (groups + [(1, vocab), (1, vocab)])[:2]
    if len(groups) < 2:
        outer_stride = inner * max(inner_stride, 1)
    return logits.as_strided((outer, inner, vocab), (outer_stride, inner_stride, 1))


# ------------------------------------------------------------------------------------------------
# Custom ops: the native op's fake kernel, and the Triton op


def allocate_outputs(logits, token_ids, topk):
    """The ops' outputs by name for ``logits`` viewed as ``[outer, inner, V]`` (the fake kernel's
    result, and what the Triton kernels write into)."""
    rows = logits.shape[0] * logits.shape[1]
    return allocate(OUTPUTS, logits, {"rows": rows}, requested_outputs(token_ids, topk))


def _fake(logits, temperature, temperature_scalar, token_ids, topk):
    return tuple(allocate_outputs(logits, token_ids, topk).values())


def run_triton(logits, temperature, temperature_scalar, token_ids, topk, splits=None):
    """The Triton kernels on the custom op's arguments, into freshly allocated outputs; returns
    them in table order (the custom op's result). ``splits`` forces the number of programs per row
    (tests use it to cover both launch paths on any size). Needs Triton."""
    from ...triton_kernels.logit_stats import logit_stats_triton  # optional dependency: Triton

    outputs = allocate_outputs(logits, token_ids, topk)
    logit_stats_triton(logits, temperature, temperature_scalar, token_ids, topk, outputs, splits)
    return tuple(outputs.values())


def _register_ops():
    if _native.native_module() is not None:
        torch.library.register_fake("fusedecode::logit_stats")(_fake)
        torch.library.register_autograd("fusedecode::logit_stats", _backward, setup_context=_setup_context)
    if triton_import_error() is not None:
        return

    def run_triton_op(logits, temperature, temperature_scalar, token_ids, topk):
        return run_triton(logits, temperature, temperature_scalar, token_ids, topk)

    # A custom op with an explicit fake kernel (rather than torch.library.triton_op) so that shape
    # propagation never runs the kernels, which also keeps it working under TRITON_INTERPRET=1.
    op = torch.library.custom_op("fusedecode::logit_stats_triton", run_triton_op, mutates_args=(),
                                 schema=SCHEMAS["logit_stats_triton"])
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup_context)


_register_ops()
