"""SASS instruction counts of logit_stats_kernel, per instantiation and arch, without a GPU.

Compiles csrc/include/fusedecode/logit_stats.cuh (from the tree at ``--root``, default this checkout)
for sm_80 and sm_90 with nvcc, disassembles with cuobjdump (triton's copy when none is on PATH), and
prints per kernel: every instruction but NOP, the hot loop (the innermost loop, by backward branch,
that holds the 16-byte vector loads), registers and stack. Compare two trees to see what a change to
the kernel's source did to its machine code (benchmarks/NOTES.md, "logit_stats_kernel in named steps").

    python benchmarks/sass_counts.py [--root OTHER_CHECKOUT]
"""

import argparse
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")
INSTANTIATIONS = """#include "fusedecode/logit_stats.cuh"
namespace fusedecode::cuda {
template cudaError_t launch_logit_stats<float>(const LogitStatsParams&, cudaStream_t);
template cudaError_t launch_logit_stats<__half>(const LogitStatsParams&, cudaStream_t);
template cudaError_t launch_logit_stats<__nv_bfloat16>(const LogitStatsParams&, cudaStream_t);
}
"""
DTYPES = {"13__nv_bfloat16": "bf16", "6__half": "f16", "f": "f32"}


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def kernel_name(mangled):
    match = re.search(r"logit_stats_kernelI(\w+?)Lb([01])E", mangled)
    return f"{DTYPES[match.group(1)]} topk={match.group(2)}" if match else mangled


def functions(sass):
    """{mangled name: [(address, instruction)]}, NOPs left out."""
    result, current = {}, None
    for line in sass.splitlines():
        match = re.search(r"Function : (\S+)", line)
        if match:
            current = result.setdefault(match.group(1), [])
            continue
        match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match and current is not None and match.group(2) != "NOP":
            current.append((int(match.group(1), 16), match.group(2)))
    return result


def hot_loop(instructions):
    """Instructions of the innermost backward-branch span that contains a 128-bit global load."""
    loads = [address for address, text in instructions if "LDG" in text and ".128" in text]
    best = None
    for address, text in instructions:
        match = re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if match and int(match.group(1), 16) < address:
            span = (int(match.group(1), 16), address)
            if any(span[0] <= load <= span[1] for load in loads) and (best is None or span[1] - span[0] < best[1] - best[0]):
                best = span
    return sum(1 for address, _ in instructions if best and best[0] <= address <= best[1])


def resources(tool, cubin):
    """{mangled name: 'REG:n STACK:n'}."""
    text = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", text)
    return {name: f"REG:{reg} STACK:{stack}" for name, reg, stack in found}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=ROOT, help="checkout whose csrc/include is compiled")
    args = parser.parse_args()
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "kernels.cu")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write(INSTANTIATIONS)
        for arch in ARCHS:
            cubin = os.path.join(work, f"sm{arch}.cubin")
            subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-I",
                            os.path.join(args.root, "csrc", "include"), "-o", cubin, source], check=True)
            sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
            usage = resources(tool, cubin)
            for name, instructions in sorted(functions(sass).items(), key=lambda item: kernel_name(item[0])):
                print(f"sm_{arch} {kernel_name(name):12s} total {len(instructions):5d}  hot loop "
                      f"{hot_loop(instructions):5d}  {usage.get(name, '')}")


if __name__ == "__main__":
    main()
