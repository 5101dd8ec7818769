"""``linear_cross_entropy_entropy``'s argument checks (docs/errors.md), written with the primitives of
``_validation.py``: checks only; turning the arguments into the custom ops' inputs is ``op.py``'s
next step.
"""

import torch

from ..._validation import FLOAT_DTYPES, check_int, check_temperature, check_tensor, values_checkable


def check_linear_ce_args(hidden, weight, targets, delta, temperature, ignore_index, chunk):
    """``linear_cross_entropy_entropy``'s arguments but the head transform (``head_transform``).

    ``hidden`` is ``[T, H]`` or ``[B, T, H]`` (float64 is accepted for the torch backend), ``weight``
    ``[V, H]`` of the same dtype, ``targets`` int64 of hidden's leading shape, ``delta`` None, ``[H]``
    or (batched) ``[B, H]`` of hidden's dtype or float32. Target values are checked on CPU only: on a GPU it
    would cost a synchronisation, and the kernels turn an out-of-range target into a NaN loss instead.
    """
    check_tensor("hidden", hidden, FLOAT_DTYPES + (torch.float64,))
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape [T, H] or [B, T, H], got {tuple(hidden.shape)}")
    *_, tokens, width = hidden.shape
    if tokens < 1:
        raise ValueError(f"hidden must have T >= 1 rows, got shape {tuple(hidden.shape)}")
    if hidden.dim() == 3 and hidden.shape[0] < 1:
        raise ValueError(f"hidden must have B >= 1 batch entries, got shape {tuple(hidden.shape)}")

    check_tensor("weight", weight, (hidden.dtype,), device=hidden.device, device_of="hidden", dtype_of="hidden")
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must have shape [V, H] with H = {width} (hidden's last dim), got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have V >= 1 rows")
    check_tensor("targets", targets, (torch.int64,), shape=hidden.shape[:-1], device=hidden.device,
                 device_of="hidden")
    if delta is not None:
        shapes = [(width,)] + ([(hidden.shape[0], width)] if hidden.dim() == 3 else [])
        check_tensor("delta", delta, tuple(dict.fromkeys((hidden.dtype, torch.float32))), shape=shapes,
                     device=hidden.device, device_of="hidden", dtype_of="hidden")

    check_temperature(temperature)
    check_int("ignore_index", ignore_index, -2**63, 2**63 - 1)
    if chunk is not None:
        check_int("chunk", chunk, 1, 2**31 - 1)

    if targets.device.type == "cpu" and values_checkable(targets):
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                             f"got {int(targets[bad][0])}")
