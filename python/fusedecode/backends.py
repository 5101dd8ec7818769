"""Backend selection (DESIGN section 2).

``backend=None`` means ``$FUSEDECODE_BACKEND``, or ``"auto"``: cuda, then triton, then torch for CUDA
tensors; cpp, then torch for CPU tensors. A backend named explicitly that cannot run the inputs
raises ``RuntimeError`` with the reason; only ``auto`` falls back.
"""

import functools
import os

import torch

from . import _native

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def triton_interpret_mode():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name, device):
    """Why backend ``name`` cannot run tensors on ``device`` (None when it can)."""
    device = torch.device(device)
    if name == "torch":
        return None
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
        error = _triton_import_error()
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
def resolve_backend(backend, device):
    """The backend that will run an op on ``device`` for the ``backend=`` argument given.

    A host-side decision: under ``torch.compile`` it is made once at trace time and baked into the
    graph (changing ``FUSEDECODE_BACKEND`` later does not retrace).
    """
    name = backend if backend is not None else os.environ.get("FUSEDECODE_BACKEND", "auto")
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        origin = "backend" if backend is not None else "FUSEDECODE_BACKEND"
        raise ValueError(f"{origin} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    device = torch.device(device)
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason:
            raise RuntimeError(f"backend {name!r} cannot run these inputs: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def available_backends():
    """Backends this install can run on the devices present (CPU, and CUDA if a GPU is visible)."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [name for name in BACKENDS if any(unavailable_reason(name, d) is None for d in devices)]
