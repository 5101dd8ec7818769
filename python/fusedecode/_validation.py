"""The primitives every check of fusedecode's arguments is written with, before any kernel runs
(docs/errors.md). Each op's own argument check (``check_<op>_args``) sits in its slice,
``ops/<op>/checks.py``, written with these.

One vocabulary for every op and integration: a wrong Python type or tensor dtype raises
``ArgumentTypeError`` (a ``TypeError``, and also a ``ValueError`` so that code catching ValueError for
every bad argument keeps working), a wrong value, shape, rank or device raises ``ValueError``; each
message names the argument. The primitives (``check_tensor``, ``check_int``, ``check_float``,
``check_temperature``) are what every op's ``check_*_args`` and every config is written with. Checks
only check: turning arguments into a kernel's inputs is the op's own next step.

Checks that need the values of a CUDA tensor (token ids in range, temperatures positive, tree
parents) cost one host synchronisation; they are skipped while ``torch.compile`` traces or a CUDA
graph is being captured, where the kernels instead turn such rows into NaN.
"""

import math
import numbers
import operator
import struct

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# The kernels compute in float32 with inv_t = 1 / T: a temperature is valid when, rounded to float32,
# it is finite and > 0 and its reciprocal is finite too (about 3e-39 < T < 3.4e38).
TEMPERATURE_RANGE = "finite and > 0 with 1/temperature finite in float32 (about 3e-39 < T < 3.4e38)"


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype: a TypeError, and also a ValueError, so that code
    catching ValueError for every bad argument (as docs/errors.md allows) keeps working."""


# ------------------------------------------------------------------------------------------------
# Primitives


def values_checkable(tensor):
    """False while tracing or capturing, where reading tensor values would break the graph."""
    if torch.compiler.is_compiling():
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def is_real_number(value):
    """A Python or NumPy real number (np.float32 included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _dtype_names(dtypes):
    names = [str(dtype).replace("torch.", "") for dtype in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(name, value, dtypes, *, dims=None, shape=None, device=None, device_of="logits", dtype_of=None):
    """``value`` is a tensor of one of ``dtypes`` (else ``ArgumentTypeError``) and, where given, of a
    rank in ``dims``, of ``shape`` (a tuple, or a list of allowed tuples) and on ``device`` (the
    device of the argument named ``device_of``), else ``ValueError``.

    ``dtype_of`` names the argument whose dtype ``dtypes[0]`` is (a dtype that must match another
    argument's): the message then names both dtypes and says they must match."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        if dtype_of is None:
            raise ArgumentTypeError(f"{name} must be {_dtype_names(dtypes)}, got {value.dtype}")
        also = f" (or {_dtype_names(dtypes[1:])})" if len(dtypes) > 1 else ""
        raise ArgumentTypeError(f"{name} is {_dtype_names([value.dtype])} but {dtype_of} is {_dtype_names(dtypes[:1])}: "
                                f"{name} must match {dtype_of}'s dtype{also}; cast one of them, e.g. "
                                f"{name}.to({dtype_of}.dtype)")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")
    if shape is not None:
        allowed = shape if isinstance(shape, list) else [shape]
        if tuple(value.shape) not in [tuple(s) for s in allowed]:
            raise ValueError(f"{name} must have shape {' or '.join(str(tuple(s)) for s in allowed)}, "
                             f"got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} and {device_of} on {device}: they must be on the same device")


def check_last_dim_contiguous(name, tensor):
    """The kernels read rows with stride 1 (any other strides are free)."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got stride {tensor.stride(-1)}")


def check_int(name, value, low, high=None):
    """A Python or NumPy integer (not a bool) >= ``low`` (and <= ``high``); returns it as an int."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_float(name, value, low=-math.inf, high=math.inf, allow_infinite=False):
    """A real number (Python or NumPy, not a bool) in [low, high]; never NaN; infinite only if
    allowed. Returns it as a float."""
    if not is_real_number(value):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (not allow_infinite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'non-NaN' if allow_infinite else 'finite'} float, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _to_float32(value):
    """A Python float rounded to float32 (+-inf beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # some Pythons refuse to pack what rounds to inf
        return math.copysign(math.inf, value)


def float32_temperature_ok(value):
    """The temperature rule for one Python number (no tensor ops: this runs on every call)."""
    t32 = _to_float32(value)
    return t32 > 0 and math.isfinite(t32) and math.isfinite(_to_float32(1.0 / t32))


def temperature_in_float32_range(temperature):
    """The temperature rule, entry by entry, for a floating-point tensor (any dtype)."""
    t32 = temperature.to(torch.float32)
    return torch.isfinite(t32) & (t32 > 0) & torch.isfinite(1.0 / t32)


def check_temperature(temperature, *, rows_of=None, allow_zero=False, name="temperature"):
    """The one temperature rule (``TEMPERATURE_RANGE``), or 0 too with ``allow_zero`` (greedy).

    A real number, or, when ``rows_of`` (the logits ``[..., V]``) is given, also a floating-point
    tensor of shape ``[...]`` on their device, checked entry by entry.
    """
    bound = ("0 or " if allow_zero else "") + TEMPERATURE_RANGE
    if isinstance(temperature, torch.Tensor) and rows_of is not None:
        if not temperature.dtype.is_floating_point:
            raise ArgumentTypeError(f"{name} must be a float or a floating-point tensor, got {temperature.dtype}")
        rows_shape = rows_of.shape[:-1]
        if temperature.shape != rows_shape:
            raise ValueError(f"{name} tensor must have shape {tuple(rows_shape)} (one per row), "
                             f"got {tuple(temperature.shape)}")
        if temperature.device != rows_of.device:
            raise ValueError(f"{name} is on {temperature.device} and logits on {rows_of.device}: they must be on the "
                             f"same device")
        if values_checkable(temperature):
            ok = temperature_in_float32_range(temperature)
            if allow_zero:
                ok |= temperature == 0
            if not bool(ok.all()):
                bad = temperature[~ok].reshape(-1)[0].item()
                raise ValueError(f"{name} must be {bound} in every row, got {bad}")
        return
    if not is_real_number(temperature):
        kinds = "a float or a tensor" if rows_of is not None else "a float"
        raise ArgumentTypeError(f"{name} must be {kinds}, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not ((allow_zero and temperature == 0) or float32_temperature_ok(temperature)):
        raise ValueError(f"{name} must be {bound}, got {temperature}")


def check_logits(name, logits):
    """Logits ``[..., V]``: float32/float16/bfloat16, 1 <= V < 2^31, last dimension contiguous."""
    check_tensor(name, logits, FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{name} must have V >= 1 entries in its last dimension, got shape {tuple(logits.shape)}")
    if vocab >= 2**31:
        raise ValueError(f"{name}: V must be below 2^31, got {vocab}")
    check_last_dim_contiguous(name, logits)


def check_tree_parents(parents, name="parents"):
    """A draft tree as ``parents`` ``[N]`` or ``[B, N]`` (int64): ``parents[0] == -1`` and
    ``0 <= parents[i] < i`` for every other node, which rules out cycles, self-parents, a second
    root and out-of-range parents. ``ValueError`` naming the first bad node otherwise. Reads the
    values (one synchronisation for CUDA tensors)."""
    nodes = parents.shape[-1]
    rows = parents.reshape(-1, nodes)
    index = torch.arange(nodes, device=parents.device)
    bad = (rows < 0) | (rows >= index)
    bad[:, 0] = rows[:, 0] != -1
    if not bool(bad.any()):
        return
    row, node = (int(v) for v in torch.nonzero(bad)[0])
    value = int(rows[row, node])
    where = f" in row {row}" if parents.dim() == 2 else ""
    if node == 0:
        raise ValueError(f"{name}: the root (node 0) must have parent -1, got {value}{where}")
    raise ValueError(f"{name} must satisfy parents[0] == -1 and 0 <= parents[i] < i for i >= 1 (a tree in "
                     f"topological order: no cycle or self-parent): node {node} has parent {value}{where}")


def check_values_in_range(name, values, low, high, note=""):
    """Every entry of an integer tensor in [low, high) (one synchronisation for CUDA tensors; skipped
    while tracing or capturing)."""
    if values.numel() and values_checkable(values):
        lowest, highest = int(values.min()), int(values.max())
        if lowest < low or highest >= high:
            raise ValueError(f"{name} must be in [{low}, {high}){note}, got values in [{lowest}, {highest}]")


def check_no_grad(op, instead, **tensors):
    """An op that computes no gradient refuses, while grad mode is on, inputs that require one
    (``tensors``: argument name -> tensor or None), rather than returning outputs that silently
    carry none: ``ValueError`` naming the first such argument and what to do instead."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            raise ValueError(f"{name} requires grad, but {op} computes no gradients ({instead}); pass {name}.detach() "
                             f"or call it under torch.no_grad()")
