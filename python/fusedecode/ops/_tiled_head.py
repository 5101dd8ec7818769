"""The tiled language-model head: the one code path of the ops that compute a head's logits
themselves and reduce them row by row (``linear_logit_stats``, ``linear_cross_entropy_entropy``).

Rows go through ``chunk`` at a time (``head_chunks``), so only one ``[chunk, V]`` buffer of logits is
alive at a time. Each chunk's logits are one matmul accumulated in float32 (float64 for float64
inputs) and never rounded to a half-precision dtype on the way (``head_matmul``); the per-row offset
(the lm_head bias, plus ``delta @ weight.T`` for SRGen; ``head_offsets``) and the head transform
(``fusedecode.head_transform``) then act on them in place (``transform_chunk``). What an op computes
from a chunk's rows is its own step; each step's per-row results go into the op's output rows
``[start, stop)`` (``output_rows``), which is all the merging row-independent statistics need.
"""

import functools

import torch

from ..head_transform import apply_head_transform

__all__ = ["CHUNK_BYTES", "default_chunk", "accumulate_dtype", "matmul", "head_matmul", "head_offsets", "transform_chunk",
           "head_chunks", "output_rows"]

# chunk * V float32 logits per chunk: 48 MiB sits in the middle of the 32-64 MiB that keep the
# matmuls large enough to run at full speed without the chunk dominating memory.
CHUNK_BYTES = 48 << 20
# Half-precision weights on CPU are widened to float32 this many bytes at a time (torch's CPU matmul
# has no float32 output for half inputs): a slice small enough to stay in cache, large enough that
# each slice's matmul runs at full speed.
_WIDEN_BYTES = 8 << 20


def default_chunk(vocab):
    """Rows per chunk so that one chunk of float32 logits takes about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def accumulate_dtype(dtype):
    """What logits of ``dtype`` inputs accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _has_mm_out_dtype():
    return "dtype" in torch.ops.aten.mm.overloads()


def matmul(a, b, accumulate):
    """``a @ b`` accumulated in and returned as ``accumulate``, ``a`` cast to ``b``'s dtype (the weight
    or hidden side). Products of half-precision inputs come back unrounded on CUDA (``out_dtype``);
    on CPU they are rounded to the half dtype first (torch's CPU matmul has no float32 output for
    them): what the gradient contractions of ``linear_cross_entropy_entropy`` use, as Liger-Kernel
    does. The head's own logits come from ``head_matmul``, never rounded."""
    a = a.to(b.dtype)
    if b.dtype == accumulate:
        return torch.mm(a, b)
    if b.is_cuda and _has_mm_out_dtype():
        return torch.mm(a, b, out_dtype=accumulate)
    return torch.mm(a, b).to(accumulate)


def head_matmul(rows, weight, accumulate, out=None):
    """``rows @ weight.T`` (``[n, H]`` by ``[V, H]``) as ``[n, V]`` in ``accumulate``, written into
    ``out`` (contiguous ``[n, V]`` of ``accumulate``) when given.

    Products of half-precision inputs are summed in float32 and returned unrounded, as cuBLAS does
    for a model's head: on CUDA through ``matmul``, on CPU by widening the weight to float32 one
    slice of the vocabulary at a time (the product of two float16/bfloat16 numbers is exact in
    float32, so both give the float32 sum of the exact products).
    """
    if weight.dtype == accumulate:
        return torch.mm(rows.to(accumulate), weight.T, out=out)
    if weight.is_cuda and _has_mm_out_dtype():
        logits = matmul(rows, weight.T, accumulate)
        return logits if out is None else out.copy_(logits)
    wide_rows = rows.to(weight.dtype).to(accumulate)
    vocab, width = weight.shape
    logits = out if out is not None else wide_rows.new_empty((rows.shape[0], vocab))
    step = max(1, _WIDEN_BYTES // (4 * width))
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        torch.mm(wide_rows, weight[start:stop].to(accumulate).T, out=logits[:, start:stop])
    return logits


def head_offsets(weight, delta, bias, accumulate):
    """The rows added to every logit row: ``delta @ weight.T + bias``, ``[B, V]`` with a ``[B, H]``
    delta, ``[V]`` with only a bias, None without either. Kept apart from the hidden states so that a
    small float32 ``delta`` is not rounded away by adding it to half-precision ones."""
    offset = head_matmul(delta, weight, accumulate) if delta is not None else None
    if bias is not None:
        offset = bias.to(accumulate).contiguous() if offset is None else offset + bias.to(accumulate)
    return offset


def transform_chunk(logits, offset, logit_scale, softcap):
    """The model's logits from a chunk's ``rows @ weight.T``, in place: ``+ offset`` (``[V]`` or None),
    then the head transform. Returns ``logits``."""
    if offset is not None:
        logits += offset
    return apply_head_transform(logits, logit_scale, softcap)


def head_chunks(rows, weight, chunk, accumulate):
    """``(start, stop, logits)`` for consecutive row ranges of ``rows`` ``[n, H]``: ``logits`` is
    ``head_matmul(rows[start:stop], weight)``, untransformed, valid until the next chunk is made.

    On CPU every chunk reuses one ``[chunk, V]`` buffer: a fresh one per chunk (tens of MiB, beyond
    what the allocator keeps mapped) would page-fault its memory in again every time, which costs
    more than the matmul gains from going chunk by chunk. On CUDA the caching allocator already
    hands the same memory back; there each chunk's buffer is released when the next one is made as
    long as the caller keeps no reference to it (``del logits`` at the end of the loop body).
    """
    count, vocab = rows.shape[0], weight.shape[0]
    buffer = None
    if rows.device.type == "cpu" and count:
        buffer = rows.new_empty((min(chunk, count), vocab), dtype=accumulate)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        logits = head_matmul(rows[start:stop], weight, accumulate, buffer[:stop - start] if buffer is not None else None)
        yield start, stop, logits
        del logits


def output_rows(outputs, start, stop):
    """Views of rows ``[start, stop)`` of every output (by name): where one chunk's per-row results
    go. An output not computed (an empty placeholder) stays empty."""
    return {name: tensor[start:stop] if tensor.numel() else tensor for name, tensor in outputs.items()}
