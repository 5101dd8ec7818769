"""Backend selection (docs/backends.md).

``backend=None`` means ``$FUSEDECODE_BACKEND``, or ``"auto"``: cuda, then triton, then torch for CUDA
tensors; cpp, then torch for CPU tensors, skipping what the op does not implement. A backend named
explicitly (argument or ``$FUSEDECODE_BACKEND``) that cannot run the inputs, or that the op does not
implement, raises ``RuntimeError`` with the reason; only ``auto`` falls back.
"""

import functools
import os
from typing import NamedTuple, Tuple

import torch

from . import _native

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class OpBackends(NamedTuple):
    """The backends an op implements, and its public name for messages."""

    op: str
    implemented: Tuple[str, ...] = BACKENDS


@functools.lru_cache(maxsize=None)
def triton_import_error():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def triton_interpret_mode():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name, device, dtype=None):
    """Why backend ``name`` cannot run tensors on ``device`` (None when it can). Only the torch
    backend computes in float64: every kernel reads float64 ``dtype`` inputs as float32."""
    device = torch.device(device)
    if name == "torch":
        return None
    if dtype == torch.float64:
        return "its kernels compute in float32; use backend='torch' for float64"
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, these are on {device}"
        return _native.native_unavailable_reason()
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        reason = _native.native_unavailable_reason()
        if reason:
            return reason
        if not _native.has_native_cuda():
            return "fusedecode._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        return None
    if name == "triton":
        error = triton_import_error()
        if error:
            return f"triton is not importable ({error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpret_mode():
                return None
            return "the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        return f"the triton backend does not run on {device}"
    raise ValueError(f"backend must be one of {BACKENDS + ('auto',)} or None, got {name!r}")


@torch.compiler.assume_constant_result
def resolve_backend(backend, device, op=None, dtype=None):
    """The backend that will run ``op`` (an ``OpBackends``; None: an op with every backend) on
    ``device`` for the ``backend=`` argument given; ``dtype`` is the dtype of its inputs (float64
    needs torch). Every op has the torch backend, the last resort of ``auto``.

    A host-side decision: under ``torch.compile`` it is made once at trace time and baked into the
    graph (changing ``FUSEDECODE_BACKEND`` later does not retrace).
    """
    name = backend if backend is not None else os.environ.get("FUSEDECODE_BACKEND", "auto")
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        origin = "backend" if backend is not None else "FUSEDECODE_BACKEND"
        raise ValueError(f"{origin} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    device = torch.device(device)
    op = op if op is not None else OpBackends("this op")
    if name != "auto":
        if name not in op.implemented:
            origin = "" if backend is not None else " (from FUSEDECODE_BACKEND)"
            raise RuntimeError(f"backend {name!r}{origin} is not implemented for {op.op} (it has "
                               f"{', '.join(map(repr, op.implemented))})")
        reason = unavailable_reason(name, device, dtype)
        if reason:
            raise RuntimeError(f"backend {name!r} cannot run these inputs: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if candidate in op.implemented and unavailable_reason(candidate, device, dtype) is None:
            return candidate
    return "torch"


def available_backends():
    """Backends this install can run on the devices present (CPU, and CUDA if a GPU is visible)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [name for name in BACKENDS if any(unavailable_reason(name, d) is None for d in devices)]
