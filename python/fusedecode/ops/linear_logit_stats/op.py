"""``fusedecode.linear_logit_stats``: ``logit_stats`` of a language-model head's logits, tile by tile.

The definitions are written once, in ``linear_logit_stats``'s docstring below (the statistics are
``logit_stats``'s, ``ops/logit_stats/``); the test oracle is ``logit_stats_reference`` of
``head_logits_reference`` (``fusedecode.reference``). Every backend walks the same tiled head (``ops/_tiled_head.py``:
chunks of rows, float32 logits per chunk, the head transform in place, shared with
``linear_cross_entropy_entropy``) and differs only in the statistics of a chunk: ``torch`` computes
them with ``logit_stats_reference``; ``cpp`` and ``cuda`` with the native
``fusedecode::logit_stats`` (custom op ``fusedecode::linear_logit_stats``, implemented here in
Python); ``triton`` with the kernels of ``triton_kernels/logit_stats.py``, which write straight into
the output rows (custom op ``fusedecode::linear_logit_stats_triton``). On a GPU each chunk's matmul
is cuBLAS. The template of ``ops/logit_stats/`` (``ops/README.md``); the schemas are in
``contract.py``, the argument checks in ``checks.py``.
"""

import operator

import torch

from ... import _native
from ..._validation import check_no_grad
from ...backends import resolve_backend, triton_import_error
from ...head_transform import check_head_transform
from .._outputs import allocate, by_name
from .._tiled_head import default_chunk, head_chunks, head_offsets, output_rows, transform_chunk
from ..logit_stats.contract import OUTPUTS, LogitStats, requested_outputs
from ..logit_stats.op import temperature_arguments
from ..logit_stats.reference import logit_stats_reference
from .checks import check_linear_logit_stats_args
from .contract import BACKENDS, SCHEMAS

__all__ = ["linear_logit_stats"]

# ------------------------------------------------------------------------------------------------
# The public function


def linear_logit_stats(hidden, weight, *, bias=None, logit_scale=None, softcap=None, temperature=1.0, token_ids=None,
                       topk=0, chunk=None, backend=None):
    """``fusedecode.logit_stats`` of a language-model head's logits, without materialising them.

    For every row ``t`` of ``hidden``, the logits are accumulated in float32 as a model's head makes
    them (for float16/bfloat16 inputs: the float32 sum of the exact products, never rounded to the
    input dtype), each step only if its argument is given:

        z_t = hidden_t @ weight.T + bias
        z_t = z_t * logit_scale
        z_t = softcap * tanh(z_t / softcap)

    and the result is exactly ``logit_stats(z, temperature=..., token_ids=..., topk=...)``: every
    field, its accuracy, masking (-inf logits) and NaN rules are ``logit_stats``'s. Rows go through
    ``chunk`` at a time, so the extra memory is one chunk of float32 logits, ``chunk * V * 4``
    bytes, never ``[..., T, V]`` (19 GB in float32 at T = 32k, V = 152k). No gradients: inputs
    that require grad while grad mode is on raise ValueError (``logit_stats`` of materialised logits
    is differentiable; ``linear_cross_entropy_entropy`` is the differentiable fused head).

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
        [0.8332, 1.0986]
    """
    check_linear_logit_stats_args(hidden, weight, temperature, token_ids, topk, chunk)
    transform = check_head_transform(bias, logit_scale, softcap, weight)
    check_no_grad("linear_logit_stats", "logit_stats of the materialised logits is differentiable, and "
                  "linear_cross_entropy_entropy is the differentiable fused head", hidden=hidden, weight=weight,
                  bias=bias, temperature=temperature)
    topk = operator.index(topk)
    name = resolve_backend(backend, hidden.device, BACKENDS)

    rows_shape = hidden.shape[:-1]
    temperature_rows, temperature_scalar = temperature_arguments(temperature)
    token_rows = token_ids.reshape(-1).to(torch.int64).contiguous() if token_ids is not None else None
    chunk = operator.index(chunk) if chunk is not None else default_chunk(weight.shape[0])
    arguments = (hidden.reshape(-1, hidden.shape[-1]), weight, transform.bias, transform.logit_scale,
                 transform.softcap, temperature_rows, temperature_scalar, token_rows, topk, chunk)
    with torch.no_grad():
        if name == "torch":
            results = _tiled_stats(*arguments, _chunk_stats_torch)
        elif name == "triton":
            results = torch.ops.fusedecode.linear_logit_stats_triton(*arguments)
        else:  # cpp or cuda: the native logit_stats, dispatched on the device
            results = torch.ops.fusedecode.linear_logit_stats(*arguments)
    fields = by_name(OUTPUTS, results, requested_outputs(token_ids, topk))
    return LogitStats(**{field: value.view(rows_shape) if value is not None else None
                         for field, value in fields.items()})


# ------------------------------------------------------------------------------------------------
# The tiled pass, shared by every backend (they differ only in the statistics of one chunk)


def _tiled_stats(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids, topk, chunk,
                 chunk_stats):
    """The statistics of every row, ``chunk`` rows of logits at a time: ``chunk_stats(logits,
    temperature, temperature_scalar, token_ids, topk, into)`` writes one chunk's into ``into``, the
    outputs' views of its rows. Returns the outputs in table order."""
    outputs = allocate_outputs(rows, token_ids, topk)
    offset = head_offsets(weight, None, bias, torch.float32)
    for start, stop, logits in head_chunks(rows, weight, chunk, torch.float32):
        transform_chunk(logits, offset, logit_scale, softcap)
        chunk_stats(logits, _rows(temperature, start, stop), temperature_scalar, _rows(token_ids, start, stop), topk,
                    output_rows(outputs, start, stop))
        del logits  # before the next chunk's logits are made
    return tuple(outputs.values())


def _rows(tensor, start, stop):
    return tensor[start:stop] if tensor is not None else None


def _copy_into(into, results):
    for name, target in into.items():
        if target.numel():
            target.copy_(results[name])


def _chunk_stats_torch(logits, temperature, temperature_scalar, token_ids, topk, into):
    stats = logit_stats_reference(logits, temperature if temperature is not None else temperature_scalar, token_ids,
                                  topk)
    _copy_into(into, stats._asdict())


def _chunk_stats_native(logits, temperature, temperature_scalar, token_ids, topk, into):
    results = torch.ops.fusedecode.logit_stats(logits.unsqueeze(0), temperature, temperature_scalar, token_ids, topk)
    _copy_into(into, by_name(OUTPUTS, results))


def _chunk_stats_triton(logits, temperature, temperature_scalar, token_ids, topk, into):
    from ...triton_kernels.logit_stats import logit_stats_triton  # optional dependency: Triton

    logit_stats_triton(logits.unsqueeze(0), temperature, temperature_scalar, token_ids, topk, into)


# ------------------------------------------------------------------------------------------------
# Custom ops: the native statistics (cpp, cuda) and the Triton ones, both implemented in Python


def allocate_outputs(rows, token_ids, topk):
    """The ops' outputs by name for hidden viewed as ``[rows, H]`` (the fake kernel's result, and
    what the tiled pass writes into)."""
    return allocate(OUTPUTS, rows, {"rows": rows.shape[0]}, requested_outputs(token_ids, topk))


def _fake(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids, topk, chunk):
    return tuple(allocate_outputs(rows, token_ids, topk).values())


def _register(name, chunk_stats):
    def run(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids, topk, chunk):
        return _tiled_stats(rows, weight, bias, logit_scale, softcap, temperature, temperature_scalar, token_ids,
                            topk, chunk, chunk_stats)

    op = torch.library.custom_op(f"fusedecode::{name}", run, mutates_args=(), schema=SCHEMAS[name])
    op.register_fake(_fake)


def _register_ops():
    if _native.native_module() is not None:
        _register("linear_logit_stats", _chunk_stats_native)
    if triton_import_error() is None:
        _register("linear_logit_stats_triton", _chunk_stats_triton)


_register_ops()
