"""Output tables: each op's outputs written once, read by name at every language boundary.

An op lists its outputs in order as ``Output`` rows. The table gives the public NamedTuple, the return
list of the op's schema (the Triton op's schema is built from it; the C++ schema in ``csrc/ops.cpp``
must equal it: ``tests/ops/test_registry.py``), and the allocations of the fake kernel and of the
Triton custom op (one function for both). C++ keeps the same fields in named structs
(``csrc/*_op.h``) and the Triton kernels take them as ``<name>_ptr`` keyword arguments, so no output
is ever found by its position.
"""

import collections
from typing import NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["Output", "schema_returns", "allocate", "by_name", "named_tuple", "public_fields"]


class Output(NamedTuple):
    """One output tensor of an op.

    ``dtype`` is a torch dtype, or the name of one given per call (``"accumulate"``: float32 or
    float64 after the inputs). ``shape`` names its dimensions (``("batch", "width")``); each call
    gives their sizes.
    ``requested_by`` is None for an output that is always computed, else the name of the per-call
    condition (usually the argument) that asks for it: when that is false the op returns an empty
    ``[0]`` tensor in its place and the public result holds None. ``fill`` is the value its
    allocation starts from (None: uninitialised, for outputs every kernel writes in full).
    """

    name: str
    dtype: Union[torch.dtype, str]
    shape: Tuple[str, ...]
    requested_by: Optional[str] = None
    fill: Optional[int] = None


def schema_returns(outputs):
    """The return list of a custom op's schema: ``(Tensor logsumexp, Tensor entropy, ...)``."""
    return "(" + ", ".join(f"Tensor {output.name}" for output in outputs) + ")"


def allocate(outputs, like, sizes, requested=None, dtypes=None):
    """Fresh output tensors on ``like``'s device, by name, in table order: ``sizes`` maps each
    dimension name to its size, ``requested`` each condition name to whether it holds, ``dtypes``
    each dtype name to a dtype. Used by fake kernels (``like`` a FakeTensor) and by the Triton
    wrappers alike."""
    tensors = {}
    for output in outputs:
        wanted = output.requested_by is None or requested[output.requested_by]
        shape = tuple(sizes[dim] for dim in output.shape) if wanted else (0,)
        dtype = output.dtype if isinstance(output.dtype, torch.dtype) else dtypes[output.dtype]
        if output.fill is None:
            tensors[output.name] = like.new_empty(shape, dtype=dtype)
        else:
            tensors[output.name] = like.new_full(shape, output.fill, dtype=dtype)
    return tensors


def by_name(outputs, values, requested=None):
    """An op's returned tensors by name. With ``requested``, those whose condition is false there
    (the empty placeholders) are None, as the public result holds them."""
    values = tuple(values)
    if len(values) != len(outputs):
        raise RuntimeError(f"expected {len(outputs)} outputs ({', '.join(o.name for o in outputs)}), got {len(values)}")
    if requested is None:
        return {output.name: value for output, value in zip(outputs, values)}
    return {output.name: value if output.requested_by is None or requested[output.requested_by] else None
            for output, value in zip(outputs, values)}


def named_tuple(typename, fields, doc):
    """The public result type: a NamedTuple with one field per ``(name, type, optional)`` in order;
    optional fields default to None. Equivalent to the ``class X(NamedTuple)`` statement, which
    cannot be written from a table. Its module is ``fusedecode``, where it is exported."""
    names = [name for name, _, _ in fields]
    optional = [optional for _, _, optional in fields]
    if optional != sorted(optional):
        raise ValueError(f"{typename}: optional fields (default None) must come last")
    cls = collections.namedtuple(typename, names, defaults=[None] * sum(optional), module="fusedecode")
    cls.__annotations__ = cls.__new__.__annotations__ = {name: kind for name, kind, _ in fields}
    cls.__doc__ = doc
    return cls


def public_fields(outputs):
    """``(name, type, optional)`` of every output, for ``named_tuple``."""
    return [(o.name, torch.Tensor if o.requested_by is None else Optional[torch.Tensor], o.requested_by is not None)
            for o in outputs]
