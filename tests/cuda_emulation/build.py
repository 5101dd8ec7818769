"""Build the emulator library: the project's CUDA headers translated (translate.py), one translation
unit per kernel family plus the runtime and the probes, compiled by the host C++ compiler in
parallel and linked into one shared library that emulator.py loads with ctypes.

The library is cached under ``build/cuda_emulation/<key>/`` of the repository, the key hashing every
input (sources, flags, compiler version), so a test session or CI stage builds it at most once.
``python tests/cuda_emulation/build.py`` builds it and prints its path.
"""

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNEL_HEADERS = os.path.join(ROOT, "csrc", "include", "fusedecode")
RUNTIME = os.path.join(HERE, "runtime")
DRIVERS = os.path.join(HERE, "drivers")
LIBRARY_NAME = "libfdemu.so"

# Translation units: (source, translated first?). The kernel families each get their own.
UNITS = (
    (os.path.join(RUNTIME, "scheduler.cpp"), False),
    (os.path.join(DRIVERS, "logit_stats_driver.cpp"), False),
    (os.path.join(DRIVERS, "verify_tree_driver.cpp"), False),
    (os.path.join(DRIVERS, "probes.cu"), True),
)
# -O1: compiles in two thirds of the time of -O2 and runs as fast (the emulator's thread switches
# dominate). Uninitialised locals get a pattern (not zero), so reading one shows up as garbage
# rather than a lucky 0. A misaligned dereference (which the GPU faults on, the CPU not) traps
# (SIGILL, reported by the emulator). _FORTIFY_SOURCE would reject the jumps between fiber stacks
# (longjmp checks).
FLAGS = ("-std=c++17", "-O1", "-g0", "-fPIC", "-pthread", "-U_FORTIFY_SOURCE", "-ftrivial-auto-var-init=pattern",
         "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error", "-Wno-unknown-pragmas")


class BuildError(RuntimeError):
    pass


def compiler():
    """The C++ compiler to use ($CXX, else c++ or g++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def source_tree_present():
    return os.path.isdir(KERNEL_HEADERS)


def _inputs():
    files = [os.path.join(KERNEL_HEADERS, name) for name in sorted(os.listdir(KERNEL_HEADERS))]
    for folder in (RUNTIME, os.path.join(RUNTIME, "fdemu"), DRIVERS):
        files += [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                  if os.path.isfile(os.path.join(folder, name))]
    return files + [os.path.join(HERE, "translate.py"), os.path.abspath(__file__)]


def _key(cxx, flags):
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join(flags).encode())
    for path in _inputs():
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _supported_flags(cxx):
    """FLAGS, without the checks the compiler lacks (-ftrivial-auto-var-init: GCC < 12)."""
    def supported(flag):
        probe = subprocess.run([cxx, flag, "-x", "c++", "-fsyntax-only", "-"], input="int main() { return 0; }",
                               capture_output=True, text=True)
        return probe.returncode == 0
    return tuple(flag for flag in FLAGS if not flag.startswith(("-ftrivial", "-fsanitize")) or supported(flag))


def _translate_tree(destination):
    """The kernel headers, translated, as destination/include/fusedecode/*; the probes too."""
    sys.path.insert(0, HERE)
    try:
        from translate import translate
    finally:
        sys.path.remove(HERE)
    include = os.path.join(destination, "include", "fusedecode")
    os.makedirs(include)
    for name in sorted(os.listdir(KERNEL_HEADERS)):
        with open(os.path.join(KERNEL_HEADERS, name), encoding="utf-8") as handle:
            text = handle.read()
        display = os.path.relpath(os.path.join(KERNEL_HEADERS, name), ROOT)
        with open(os.path.join(include, name), "w", encoding="utf-8") as handle:
            handle.write(translate(text, display))
    translated = {}
    for source, needs_translation in UNITS:
        if needs_translation:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
            target = os.path.join(destination, os.path.basename(source) + ".cpp")
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(translate(text, os.path.relpath(source, ROOT)))
            translated[source] = target
    return translated


def build(verbose=False):
    """Path of the emulator library, built if the cache has none for these inputs."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler on PATH (set CXX)")
    if not source_tree_present():
        raise BuildError(f"no CUDA sources at {KERNEL_HEADERS}")
    flags = _supported_flags(cxx)
    cache = os.path.join(ROOT, "build", "cuda_emulation", _key(cxx, flags))
    library = os.path.join(cache, LIBRARY_NAME)
    if os.path.exists(library):
        return library
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    work = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(cache))
    try:
        started = time.time()
        translated = _translate_tree(work)
        includes = ["-I", RUNTIME, "-I", DRIVERS, "-I", os.path.join(work, "include")]

        def compile_unit(unit):
            source = translated.get(unit, unit)
            obj = os.path.join(work, os.path.basename(unit) + ".o")
            command = [cxx, *flags, *includes, "-c", "-x", "c++", source, "-o", obj]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildError(f"compiling {os.path.relpath(unit, ROOT)} failed:\n{' '.join(command)}\n"
                                 f"{result.stderr[-8000:]}")
            return obj

        jobs = max(1, min(len(UNITS), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            objects = list(pool.map(compile_unit, [unit for unit, _ in UNITS]))
        linked = os.path.join(work, LIBRARY_NAME)
        result = subprocess.run([cxx, "-shared", "-pthread", *objects, "-o", linked], capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"linking the emulator failed:\n{result.stderr[-8000:]}")
        try:
            os.rename(work, cache)  # atomic: a concurrent build of the same key either wins or loses whole
        except OSError:
            if not os.path.exists(library):
                raise
        if verbose:
            print(f"built {library} in {time.time() - started:.1f}s", file=sys.stderr)
        return library
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(build(verbose=True))
