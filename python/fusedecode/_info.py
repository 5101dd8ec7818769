"""Version and build facts (``fusedecode.build_info()``, ``python -m fusedecode info``)."""

import importlib.metadata
import platform

import torch

from . import _native

try:
    __version__ = importlib.metadata.version("fusedecode")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"


def build_info():
    """How this install was built and what it runs against.

    Keys: ``version``, ``native`` (whether ``fusedecode._C`` loaded), ``native_error``, the
    extension's own facts (``torch_version`` it was built against, ``with_cuda``, ``cuda_version``,
    ``cuda_archs``, ``cpu_simd``, ``compiler``), and the runtime ``torch_runtime``,
    ``torch_runtime_cuda``, ``triton`` and ``python`` versions.
    """
    info = {"version": __version__, "native": _native.native_module() is not None,
            "native_error": _native.native_unavailable_reason()}
    info.update(_native.native_build_info() or {})
    info["torch_runtime"] = torch.__version__
    info["torch_runtime_cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["python"] = platform.python_version()
    return info
