"""Compile every Triton kernel of fusedecode ahead of time for real GPUs, with no GPU present.

    python tests/support/aot_compile_triton.py 80 90      # sm_80 and sm_90

Must run without TRITON_INTERPRET (the interpreter replaces kernels by Python functions). Prints one
line per variant (registers, spills) and exits non-zero on the first failure.
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile_triton.py must run without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedecode.triton_kernels import linear_ce as linear_ce_kernels
from fusedecode.triton_kernels import logit_stats as kernels
from fusedecode.triton_kernels import verify_tree as verify_kernels

POINTER_TYPES = {"token_ptr": "*i64", "argmax_ptr": "*i64", "count_ptr": "*i32", "argmax_ws_ptr": "*i32",
                 "tokens_ptr": "*i64", "parents_ptr": "*i64", "seeds_ptr": "*i64", "num_accepted_ptr": "*i64",
                 "accepted_nodes_ptr": "*i64", "output_tokens_ptr": "*i64", "targets_ptr": "*i64"}
INT64_ARGS = {"outer_stride", "inner_stride", "stride_b", "stride_n", "q_stride_b", "q_stride_n"}
FLOAT_ARGS = {"temperature", "inv_t", "inv_temperature", "logit_scale", "softcap"}


def signature(fn, logits_type, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "q_ptr"):
            sig[name] = logits_type
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*fp32")
        elif name in INT64_ARGS:
            sig[name] = "i64"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants():
    for logits_type, with_topk, extras in itertools.product(("*fp32", "*fp16", "*bf16"), (False, True), (False, True)):
        block = 2048 if logits_type == "*fp32" else 4096
        topk_pad = 64 if with_topk else 1
        common = dict(HAS_TEMPERATURE=extras, WITH_TOPK=with_topk, TOPK_PAD=topk_pad)
        yield kernels._row_kernel, logits_type, dict(common, HAS_TOKEN=extras, BLOCK=block), 8
        yield kernels._partial_kernel, logits_type, dict(common, BLOCK=block), 8
        yield kernels._merge_kernel, logits_type, dict(common, HAS_TOKEN=extras, SPLITS_PAD=64), 4
    for logits_type, mode in itertools.product(("*fp32", "*fp16", "*bf16"), (0, 1, 2)):
        yield verify_kernels._walk_kernel, logits_type, dict(MODE=mode, N_PAD=64, SPLITS_PAD=64, SCAN=1024), 4
    for has_offset, softcap, compute_grad in itertools.product((False, True), repeat=3):
        block = linear_ce_kernels.MAX_BLOCK  # the chunk's logits are float32 whatever the model's dtype
        yield linear_ce_kernels._chunk_kernel, "*fp32", dict(HAS_OFFSET=has_offset, SOFTCAP=softcap,
                                                             COMPUTE_GRAD=compute_grad, BLOCK=block), 8


def resource_usage(cubin):
    """Registers and stack (spill) bytes from cuobjdump, which ships inside Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "resource usage unknown"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return "regs={} stack={} shared={} local={}".format(*found.groups()) if found else "resource usage unknown"


def main(archs):
    count = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for fn, logits_type, constexprs, num_warps in variants():
            src = ASTSource(fn=fn, signature=signature(fn, logits_type, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            assert compiled.asm.get("cubin"), f"no cubin for {fn.__name__}"
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
            print(f"sm_{arch} {fn.__name__:16s} {logits_type:6s} {flags}: {resource_usage(compiled.asm['cubin'])}",
                  flush=True)
            count += 1
    print(f"compiled {count} kernel variants for sm_{', sm_'.join(map(str, archs))}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
