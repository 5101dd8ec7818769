"""The one place where fusedecode checks user arguments, before any kernel runs.

Type errors raise ``TypeError`` and bad values ``ValueError``, each naming the argument. Checks that
need the values of a CUDA tensor (token ids in range, temperatures positive) cost one host
synchronisation; they are skipped while ``torch.compile`` traces or a CUDA graph is being captured,
where the kernels instead turn such rows into NaN.
"""

import math
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_TOPK = 64


def values_checkable(tensor):
    """False while tracing or capturing, where reading tensor values would break the graph."""
    if torch.compiler.is_compiling():
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_int(name, value, low, high):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_logits(name, logits):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{name} must have V >= 1 entries in its last dimension, got shape {tuple(logits.shape)}")
    if vocab >= 2**31:
        raise ValueError(f"{name}: V must be below 2^31, got {vocab}")
    if vocab > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got stride {logits.stride(-1)}")


def check_temperature(temperature, logits, allow_zero=False):
    """Returns (per-row float32 tensor or None, scalar float)."""
    rows_shape = logits.shape[:-1]
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(temperature, torch.Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature must be a float or a floating-point tensor, got {temperature.dtype}")
        if temperature.shape != rows_shape:
            raise ValueError(f"temperature tensor must have shape {tuple(rows_shape)} (one per row), "
                             f"got {tuple(temperature.shape)}")
        if temperature.device != logits.device:
            raise ValueError(f"temperature is on {temperature.device} but logits are on {logits.device}")
        if values_checkable(temperature):
            ok = torch.isfinite(temperature) & ((temperature >= 0) if allow_zero else (temperature > 0))
            if not bool(ok.all()):
                raise ValueError(f"temperature must be finite and {bound} in every row")
        return temperature.reshape(-1).to(torch.float32).contiguous(), 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0 or (temperature == 0 and not allow_zero):
        raise ValueError(f"temperature must be finite and {bound}, got {temperature}")
    return None, temperature


def check_token_ids(token_ids, logits):
    if token_ids is None:
        return None
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a tensor or None, got {type(token_ids).__name__}")
    if token_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    rows_shape = logits.shape[:-1]
    if token_ids.shape != rows_shape:
        raise ValueError(f"token_ids must have shape {tuple(rows_shape)} (one per row), got {tuple(token_ids.shape)}")
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids is on {token_ids.device} but logits are on {logits.device}")
    vocab = logits.shape[-1]
    if token_ids.numel() and values_checkable(token_ids):
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"token_ids must be in [0, {vocab}), got values in [{low}, {high}]")
    return token_ids.reshape(-1).to(torch.int64).contiguous()


def check_logit_stats_args(logits, temperature, token_ids, topk):
    """Validate logit_stats arguments; returns (temperature_tensor, temperature_scalar, token_ids, topk)."""
    check_logits("logits", logits)
    temperature_tensor, temperature_scalar = check_temperature(temperature, logits)
    token_ids = check_token_ids(token_ids, logits)
    topk = check_int("topk", topk, 0, MAX_TOPK)
    return temperature_tensor, temperature_scalar, token_ids, topk
