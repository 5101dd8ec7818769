"""Build script of fusedecode.

Environment (docs/backends.md, "Build switches"):
  FUSEDECODE_SKIP_NATIVE=1        build no extension: pure Python + Triton + torch backends
  FUSEDECODE_BUILD_CUDA=auto|0|1  CUDA kernels when nvcc and a CUDA build of torch are present
                                  (auto); never (0); always, failing loudly without them (1)
  TORCH_CUDA_ARCH_LIST            CUDA targets, default "8.0;8.6;8.9;9.0+PTX"
  MAX_JOBS, NVCC_THREADS          parallel compile jobs, nvcc threads per job
  CUDA_HOME                       toolkit root; found from `nvcc` on PATH when unset

Never asks whether a GPU is present: build nodes of research clusters have none.

A native build records the torch it was compiled against in fusedecode/_build_meta.py, pins that
torch minor in its requirements and carries it in the local version (+cu130torch2.14,
+cputorch2.13); a pure-Python build (FUSEDECODE_SKIP_NATIVE=1) has neither.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BASE_VERSION = "0.1.0"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"

PACKAGES = ["fusedecode", "fusedecode.ops", "fusedecode.triton_kernels", "fusedecode.hf", "fusedecode.hf.speculative",
            "fusedecode.hf.correction", "fusedecode.hf.models", "fusedecode.demo", "fusedecode.vllm",
            "fusedecode.ops.logit_stats", "fusedecode.ops.verify_tree", "fusedecode.ops.linear_ce",
            "fusedecode.ops.linear_logit_stats"]
# The bundled arithmetic models (weights, configs, tokenizers) ship inside the package, and
PACKAGE_DATA = {"fusedecode": ["assets/*.json", "assets/*/*.json", "assets/*/*.safetensors"],
                # the templates of `python -m fusedecode hub-export`
                "fusedecode.hf": ["hub_templates/*"]}
PACKAGE_DIR = {"": "python", "fusedecode.triton_kernels": "triton_kernels"}


def _env_flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, not {value!r}")
    return value


def _resolve_cuda_home():
    """Point CUDA_HOME at the toolkit root, also when `nvcc` on PATH is a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return
    if head.startswith(b"#!"):
        match = re.search(rb"exec\s+[\"']?(/[^\s\"']+/bin/nvcc)", head)
        if match:
            nvcc = match.group(1).decode()
    root = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = root


def _pip_cuda_include_dirs():
    """Headers that a pip-installed CUDA torch brings (cusparse, cublas, ...) but a bare toolkit may lack.
    They are searched after the toolkit's own (``-isystem``): a torch built with a newer CUDA minor than
    nvcc (PyPI's torch 2.15.0 is CUDA 13.2) brings runtime headers that nvcc 13.0 rejects ("CUDA compiler
    and CUDA toolkit headers are incompatible") when they come first."""
    dirs = []
    for entry in sys.path:
        nvidia = os.path.join(entry, "nvidia")
        if os.path.isdir(nvidia):
            dirs += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _write_build_meta(torch_version, cuda_version, archs, native):
    """python/fusedecode/_build_meta.py: what the extension was built against, readable before the
    extension is imported (a mismatched torch must not load it)."""
    with open(os.path.join(ROOT, "python", "fusedecode", "_build_meta.py"), "w") as handle:
        handle.write('"""Written by setup.py at build time; do not edit."""\n\n'
                     f"NATIVE = {native!r}\nTORCH_VERSION = {torch_version!r}\n"
                     f"CUDA_VERSION = {cuda_version!r}\nCUDA_ARCHS = {archs!r}\n")


def _native_extensions():
    """(extensions, cmdclass, local version label, torch requirement)."""
    if os.environ.get("FUSEDECODE_SKIP_NATIVE", "0") == "1":
        _write_build_meta(None, None, None, False)
        return [], {}, None, "torch>=2.4"
    build_cuda = _env_flag("FUSEDECODE_BUILD_CUDA", "auto")
    _resolve_cuda_home()

    import torch
    from torch.utils import cpp_extension

    torch_cuda = torch.version.cuda
    nvcc_ok = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = build_cuda == "1" or (build_cuda == "auto" and torch_cuda is not None and nvcc_ok)
    if build_cuda == "1" and (torch_cuda is None or not nvcc_ok):
        raise SystemExit(
            "FUSEDECODE_BUILD_CUDA=1 needs nvcc (CUDA_HOME or PATH) and a CUDA build of torch; found "
            f"torch {torch.__version__} (CUDA {torch_cuda}) and CUDA_HOME={cpp_extension.CUDA_HOME}"
        )

    torch_major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    define_macros = [("FUSEDECODE_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++17 or C++20)
    if sys.platform.startswith("linux"):
        # ATen's parallel_for is an OpenMP region compiled into this extension.
        cxx_flags.append("-fopenmp")
    extra_link_args = ["-fopenmp"] if sys.platform.startswith("linux") else []

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        after_toolkit = [flag for path in _pip_cuda_include_dirs() for flag in ("-isystem", path)]
        cxx_flags += after_toolkit
        define_macros += [
            ("FUSEDECODE_WITH_CUDA", "1"),
            ("FUSEDECODE_CUDA_VERSION", f'"{torch_cuda}"'),
            ("FUSEDECODE_CUDA_ARCHS", f'"{archs}"'),
        ]
        nvcc_flags = ["-O3", "-lineinfo"] + after_toolkit
        if os.environ.get("NVCC_THREADS"):
            nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
        extension = cpp_extension.CUDAExtension(
            "fusedecode._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
        local = f"cu{torch_cuda.replace('.', '')}torch{torch_major_minor}"
        _write_build_meta(torch.__version__, torch_cuda, archs, True)
    else:
        extension = cpp_extension.CppExtension(
            "fusedecode._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
        local = f"cputorch{torch_major_minor}"
        _write_build_meta(torch.__version__, None, None, True)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    # The extension only works with the torch minor it was compiled against (C++ ABI).
    major, minor = (int(v) for v in torch_major_minor.split("."))
    return [extension], cmdclass, local, f"torch>={major}.{minor},<{major}.{minor + 1}"


ext_modules, cmdclass, local_version, torch_requirement = _native_extensions()

setup(
    name="fusedecode",
    version=BASE_VERSION + (f"+{local_version}" if local_version else ""),
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[torch_requirement, "numpy"],
    zip_safe=False,
)
