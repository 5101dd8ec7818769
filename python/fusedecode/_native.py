"""Loading of the compiled extension ``fusedecode._C`` (optional: FUSEDECODE_SKIP_NATIVE builds none).

The extension is compiled against one torch release (C++ ABI) and, for CUDA builds, one CUDA major
version. Before importing it, the torch that is running is compared with the one recorded at build
time (``_build_meta.py``); on a mismatch the extension is not loaded, the cpp and cuda backends
report why, and the triton and torch backends keep working.
"""

import functools
import warnings

import torch


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2]) if version else None


def build_mismatch():
    """Why the extension must not be loaded into this process (None when it can be)."""
    try:
        from . import _build_meta as meta
    except ImportError:  # a source tree that was never built
        return None
    if not meta.NATIVE:
        return None
    if _major_minor(meta.TORCH_VERSION) != _major_minor(torch.__version__):
        return (f"fusedecode._C was built against torch {meta.TORCH_VERSION} but torch {torch.__version__} is "
                f"running, so the cpp and cuda backends are disabled (triton and torch still work). Install the "
                f"fusedecode wheel built for torch {'.'.join(_major_minor(torch.__version__))}, rebuild with "
                f"`pip install --no-build-isolation .` against this torch, or install torch "
                f"{'.'.join(_major_minor(meta.TORCH_VERSION))}.*")
    if meta.CUDA_VERSION and torch.version.cuda and meta.CUDA_VERSION.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"fusedecode._C was built with CUDA {meta.CUDA_VERSION} but this torch uses CUDA {torch.version.cuda}: "
                f"the cpp and cuda backends are disabled (triton and torch still work); use a wheel built for "
                f"CUDA {torch.version.cuda.split('.')[0]}.x or rebuild.")
    return None


@functools.lru_cache(maxsize=None)
def native_module():
    """The imported ``fusedecode._C`` (registering ``torch.ops.fusedecode.*``), or None."""
    mismatch = build_mismatch()
    if mismatch:
        native_module.error = mismatch
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
        return None
    try:
        from fusedecode import _C
    except ImportError as error:
        native_module.error = f"fusedecode._C failed to import: {error}"
        return None
    return _C


native_module.error = None


def native_build_info():
    module = native_module()
    return dict(module.build_info()) if module is not None else None


def has_native_cuda():
    info = native_build_info()
    return bool(info and info.get("with_cuda"))


def native_unavailable_reason():
    if native_module() is not None:
        return None
    return native_module.error or "fusedecode._C is not built (FUSEDECODE_SKIP_NATIVE=1 or a failed build)"
