"""``fusedecode.linear_logit_stats``: ``logit_stats`` of a language-model head's logits, tile by tile.

The definitions are written once, in ``linear_logit_stats``'s docstring below (the statistics are
``logit_stats``'s); the naive oracle is ``reference.linear_logit_stats_reference``. Every backend
walks the same tiled head (``ops/_tiled_head.py``: chunks of rows, float32 logits per chunk, the head
transform in place) and differs only in the statistics of a chunk: ``torch`` computes them with
``reference.logit_stats_reference``; ``cpp`` and ``cuda`` with the native ``fusedecode::logit_stats``
(custom op ``fusedecode::linear_logit_stats``); ``triton`` with ``fusedecode::logit_stats_triton``
(custom op ``fusedecode::linear_logit_stats_triton``). On a GPU the chunk's matmul is cuBLAS.
"""

from typing import Optional, Tuple

import torch

from .. import _native
from .._types import LogitStats
from .._validation import check_linear_logit_stats_args
from ..backends import resolve_backend
from ..head_transform import check_head_transform
from ..reference import logit_stats_reference
from ._tiled_head import default_chunk, head_chunks, head_offsets, transform_chunk, write_rows

__all__ = ["linear_logit_stats"]

# Outputs: logit_stats's, one value per row of hidden (the custom ops return them flat, ``[rows]``).
FIELDS = LogitStats._fields


# ------------------------------------------------------------------------------------------------
# The public function


def linear_logit_stats(hidden, weight, *, bias=None, logit_scale=None, softcap=None, temperature=1.0, token_ids=None,
                       topk=0, chunk=None, backend=None):
    """``fusedecode.logit_stats`` of a language-model head's logits, without materialising them.

    For every row ``t`` of ``hidden``, the logits are accumulated in float32 as a model's head makes
    them, each step only if its argument is given:

        z_t = hidden_t @ weight.T + bias
        z_t = z_t * logit_scale
        z_t = softcap * tanh(z_t / softcap)

    and the result is exactly ``logit_stats(z, temperature=..., token_ids=..., topk=...)``: every
    field, its accuracy, masking (-inf logits) and NaN rules are ``logit_stats``'s. Rows go through
    ``chunk`` at a time, so the extra memory is one chunk of float32 logits, ``chunk * V * 4``
    bytes, never ``[..., T, V]`` (19 GB in float32 at T = 32k, V = 152k). No gradients (the
    statistics are measurements; ``linear_cross_entropy_entropy`` is the differentiable fused head).

    Args:
        hidden: float32/float16/bfloat16 ``[..., T, H]``: final hidden states (what lm_head reads).
        weight: ``[V, H]``, hidden's dtype (the lm_head weight).
        bias: optional ``[V]``, the weight's dtype or float32: the lm_head bias (Phi).
        logit_scale: optional finite float multiplying the logits (Cohere's ``logit_scale``; Granite
            divides by ``logits_scaling``: pass its inverse).
        softcap: optional float > 0: final soft-capping (Gemma 2/3's ``final_logit_softcapping``).
        temperature, token_ids, topk: as in ``logit_stats`` for the logits ``[..., T, V]``
            (a temperature tensor and ``token_ids`` have shape ``[..., T]``).
        chunk: rows per chunk; default keeps ``chunk * V`` float32 logits around 48 MiB.
        backend: None (``$FUSEDECODE_BACKEND`` or ``"auto"``), ``"cuda"``, ``"triton"``, ``"cpp"``,
            ``"torch"``: which ``logit_stats`` backend reduces each chunk.

    Returns:
        ``LogitStats`` of tensors shaped ``[..., T]`` on hidden's device (float32, argmax int64).

    Example::

        >>> import torch, fusedecode
        >>> hidden, weight = torch.eye(2), torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
        >>> stats = fusedecode.linear_logit_stats(hidden, weight, softcap=30.0)  # logits ~[2, 1, 0], [0, 0, 0]
        >>> stats.argmax
        tensor([0, 0])
        >>> [round(value, 4) for value in stats.entropy.tolist()]
        [0.8325, 1.0986]
    """
    check_linear_logit_stats_args(hidden, weight, temperature, token_ids, topk, chunk)
    transform = check_head_transform(bias, logit_scale, softcap, weight)
    name = resolve_backend(backend, hidden.device)
    rows_shape, width = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, width)
    temperature_rows, temperature_scalar = _temperature_arguments(temperature)
    token_rows = token_ids.reshape(-1).to(torch.int64).contiguous() if token_ids is not None else None
    chunk = int(chunk) if chunk is not None else default_chunk(weight.shape[0])
    arguments = (rows, weight, transform.bias, transform.logit_scale, transform.softcap, temperature_rows,
                 temperature_scalar, token_rows, int(topk), chunk)
    with torch.no_grad():
        if name == "torch":
            results = _tiled_stats(*arguments, _chunk_stats_torch)
        elif name == "triton":
            results = torch.ops.fusedecode.linear_logit_stats_triton(*arguments)
        else:  # cpp or cuda: the native logit_stats, dispatched on the device
            results = torch.ops.fusedecode.linear_logit_stats(*arguments)
    fields = dict(zip(FIELDS, results))
    fields["token_logprob"] = fields["token_logprob"] if token_ids is not None else None
    fields["topk_confidence"] = fields["topk_confidence"] if topk > 0 else None
    return LogitStats(**{field: value.view(rows_shape) if value is not None else None
                         for field, value in fields.items()})


# ------------------------------------------------------------------------------------------------
# From the public arguments to the custom ops' arguments


def _temperature_arguments(temperature):
    """(per-row float32 temperatures ``[rows]`` or None, the scalar temperature)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(-1).to(torch.float32).contiguous(), 1.0
    return None, float(temperature)


# ------------------------------------------------------------------------------------------------
# The tiled pass, shared by every backend (they differ only in the statistics of one chunk)


def _allocate(rows, token_ids, topk):
    """The outputs by name, ``[rows]`` each (an empty ``[0]`` placeholder for an optional output
    not requested): the fake kernel's result, and what the tiled pass writes into."""
    count = rows.shape[0]
    options = dict(dtype=torch.float32, device=rows.device)
    outputs = {field: rows.new_empty((count,), **options)
               for field in ("logsumexp", "entropy", "varentropy", "self_certainty", "max_logprob")}
    outputs["argmax"] = rows.new_empty((count,), dtype=torch.int64, device=rows.device)
    outputs["token_logprob"] = rows.new_empty((count,) if token_ids is not None else (0,), **options)
    outputs["topk_confidence"] = rows.new_empty((count,) if topk > 0 else (0,), **options)
    return outputs


def _tiled_stats(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids, topk, chunk,
                 chunk_stats):
    """The statistics of every row, ``chunk`` rows of logits at a time; ``chunk_stats(logits,
    temperature, temperature_scalar, token_ids, topk)`` gives one chunk's, by name."""
    outputs = _allocate(rows, token_ids, topk)
    offset = head_offsets(weight, None, bias, torch.float32)
    for start, stop, logits in head_chunks(rows, weight, chunk, torch.float32):
        transform_chunk(logits, offset, logit_scale, softcap)
        results = chunk_stats(logits, _rows(temperature, start, stop), temperature_scalar,
                              _rows(token_ids, start, stop), topk)
        write_rows(outputs, start, stop, results)
        del logits, results  # before the next chunk's logits are made
    return tuple(outputs[field] for field in FIELDS)


def _rows(tensor, start, stop):
    return tensor[start:stop] if tensor is not None else None


def _chunk_stats_torch(logits, temperature, temperature_scalar, token_ids, topk):
    stats = logit_stats_reference(logits, temperature if temperature is not None else temperature_scalar, token_ids,
                                  topk)
    return stats._asdict()


def _chunk_stats_op(op):
    """One chunk's statistics by a ``logit_stats`` custom op (its ``[outer, inner, V]`` view)."""
    def chunk_stats(logits, temperature, temperature_scalar, token_ids, topk):
        return dict(zip(FIELDS, op(logits.unsqueeze(0), temperature, temperature_scalar, token_ids, topk)))

    return chunk_stats


# ------------------------------------------------------------------------------------------------
# Custom ops: the native statistics (cpp, cuda) and the Triton ones


def _fake(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids, topk, chunk):
    outputs = _allocate(rows, token_ids, topk)
    return tuple(outputs[field] for field in FIELDS)


def _register(name, statistics_op):
    """``fusedecode::<name>``: the tiled pass with ``statistics_op()`` (looked up when called: the op
    that registers it may be imported after this one) reducing each chunk."""
    def run(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], logit_scale: Optional[float],
            softcap: Optional[float], temperature: Optional[torch.Tensor], temperature_scalar: float,
            token_ids: Optional[torch.Tensor], topk: int, chunk: int) -> Tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                torch.Tensor]:
        return _tiled_stats(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids,
                            topk, chunk, _chunk_stats_op(statistics_op()))

    op = torch.library.custom_op(f"fusedecode::{name}", run, mutates_args=())
    op.register_fake(_fake)


def _register_ops():
    if _native.native_module() is not None:
        _register("linear_logit_stats", lambda: torch.ops.fusedecode.logit_stats)
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    _register("linear_logit_stats_triton", lambda: torch.ops.fusedecode.logit_stats_triton)


_register_ops()
