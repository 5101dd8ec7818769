"""Loading of the compiled extension ``fusedecode._C`` (optional: FUSEDECODE_SKIP_NATIVE builds none)."""

import functools

import torch  # noqa: F401  (libtorch must be loaded before the extension)


@functools.lru_cache(maxsize=None)
def native_module():
    """The imported ``fusedecode._C`` (registering ``torch.ops.fusedecode.*``), or None."""
    try:
        from fusedecode import _C
    except ImportError as error:
        native_module.error = error
        return None
    return _C


native_module.error = None


def native_build_info():
    module = native_module()
    return dict(module.build_info()) if module is not None else None


def has_native_cpu():
    return native_module() is not None


def has_native_cuda():
    info = native_build_info()
    return bool(info and info.get("with_cuda"))


def native_unavailable_reason():
    if native_module() is not None:
        return None
    error = native_module.error
    return ("fusedecode._C is not built (FUSEDECODE_SKIP_NATIVE=1 or a failed build)" if error is None
            else f"fusedecode._C failed to import: {error}")
