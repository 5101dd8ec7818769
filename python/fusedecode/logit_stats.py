"""``fusedecode.logit_stats``: per-row uncertainty statistics of logits in one pass."""

from typing import Optional, Tuple

import torch

from . import _native
from ._types import LogitStats
from ._validation import check_logit_stats_args
from .backends import resolve_backend
from .reference import logit_stats_reference

__all__ = ["logit_stats", "LogitStats"]


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
    temperature_rows, temperature_scalar, token_rows, topk = check_logit_stats_args(
        logits, temperature, token_ids, topk)
    name = resolve_backend(backend, logits.device)
    if name == "torch":
        return logit_stats_reference(logits, temperature, token_ids, topk)

    rows_shape = logits.shape[:-1]
    view = _as_rows_3d(logits)
    if name == "triton":
        outputs = torch.ops.fusedecode.logit_stats_triton(view, temperature_rows, temperature_scalar, token_rows, topk)
    else:  # cpp or cuda: one native op, dispatched on the device
        outputs = torch.ops.fusedecode.logit_stats(view, temperature_rows, temperature_scalar, token_rows, topk)
    fields = list(outputs[:6])
    fields.append(outputs[6] if token_rows is not None else None)
    fields.append(outputs[7] if topk > 0 else None)
    if len(rows_shape) != 1:  # the ops return one entry per row: [rows]
        fields = [f.view(rows_shape) if f is not None else None for f in fields]
    return LogitStats(*fields)


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


def _fake_outputs(logits, temperature, temperature_scalar, token_ids, topk):
    shape = (logits.shape[0] * logits.shape[1],)
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        *(logits.new_empty(shape, **f32) for _ in range(5)),
        logits.new_empty(shape, dtype=torch.int64, device=logits.device),
        logits.new_empty(shape if token_ids is not None else (0,), **f32),
        logits.new_empty(shape if topk > 0 else (0,), **f32),
    )


def _register_ops():
    if _native.native_module() is not None:
        torch.library.register_fake("fusedecode::logit_stats")(_fake_outputs)

    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from .triton_kernels.logit_stats import logit_stats_triton

    # A custom op with an explicit fake kernel (rather than torch.library.triton_op) so that shape
    # propagation never runs the kernels, which also keeps it working under TRITON_INTERPRET=1.
    @torch.library.custom_op("fusedecode::logit_stats_triton", mutates_args=())
    def _logit_stats_triton(logits: torch.Tensor, temperature: Optional[torch.Tensor], temperature_scalar: float,
                            token_ids: Optional[torch.Tensor], topk: int) -> Tuple[
                                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
        return logit_stats_triton(logits, temperature, temperature_scalar, token_ids, topk)

    _logit_stats_triton.register_fake(_fake_outputs)


_register_ops()
