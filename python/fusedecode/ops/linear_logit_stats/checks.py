"""``linear_logit_stats``'s argument checks (docs/errors.md), written with the primitives of
``_validation.py``: checks only; turning the arguments into the custom ops' inputs is ``op.py``'s
next step.
"""

import torch

from ..._validation import (FLOAT_DTYPES, INDEX_DTYPES, check_int, check_temperature, check_tensor,
                            check_values_in_range)
from ..logit_stats.contract import MAX_TOPK


def check_linear_logit_stats_args(hidden, weight, temperature, token_ids, topk, chunk):
    """``fusedecode.linear_logit_stats``'s arguments but the head transform (``head_transform``):
    ``hidden`` ``[..., T, H]`` and ``weight`` ``[V, H]`` of one float dtype and device, then
    ``logit_stats``'s arguments for the logits ``[..., T, V]`` they make, and ``chunk`` None or >= 1."""
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    if hidden.dim() < 2 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., T, H] with H >= 1, got {tuple(hidden.shape)}")
    width = hidden.shape[-1]
    check_tensor("weight", weight, (hidden.dtype,), dims=(2,), device=hidden.device, device_of="hidden",
                 dtype_of="hidden")
    vocab = weight.shape[0]
    if weight.shape[1] != width or not 1 <= vocab < 2**31:
        raise ValueError(f"weight must have shape [V, H] with H = {width} (hidden's last dim) and 1 <= V < 2^31, "
                         f"got {tuple(weight.shape)}")
    # The logits [..., T, V] the head makes, as logit_stats sees them: a broadcast scalar (shape and
    # device only; nothing of that size is allocated or read).
    logits = hidden.new_empty((), dtype=torch.float32).expand(*hidden.shape[:-1], vocab)
    check_temperature(temperature, rows_of=logits)
    if token_ids is not None:
        check_tensor("token_ids", token_ids, INDEX_DTYPES, shape=logits.shape[:-1], device=hidden.device,
                     device_of="hidden")
        check_values_in_range("token_ids", token_ids, 0, vocab)
    check_int("topk", topk, 0, MAX_TOPK)
    if chunk is not None:
        check_int("chunk", chunk, 1, 2**31 - 1)
