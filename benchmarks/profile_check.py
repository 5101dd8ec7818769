"""One-launch workloads for Nsight Compute, plus the per-kernel latency floor with memory traffic.

    python benchmarks/profile_check.py latency           # graph-replayed tiny kernels vs logit_stats
    ncu --clock-control none -k regex:logit_stats_kernel python benchmarks/profile_check.py kernel
"""

import sys

import torch

import fusedecode
from fusedecode import _bench


def kernel():
    x = _bench.make_inputs(1024, 151936, torch.bfloat16, "cuda", copies=1)[0]
    for _ in range(3):
        fusedecode.logit_stats(x, backend="cuda")
    torch.cuda.synchronize()


def latency():
    src = [torch.randn(1, device="cuda") for _ in range(512)]
    dst = torch.empty(1, device="cuda")
    empty = _bench.cuda_empty_launch_time("cuda") * 1e6
    touch, _ = _bench.cuda_time_per_call(lambda s: dst.copy_(s), src)
    cold_inputs = _bench.make_inputs(1, 32000, torch.bfloat16, "cuda", copies=512)
    read_sum, _ = _bench.cuda_time_per_call(lambda x: x.sum(), cold_inputs)
    fused, _ = _bench.cuda_time_per_call(lambda x: fusedecode.logit_stats(x, backend="cuda"), cold_inputs)
    print(f"graph-replayed per-call times (us): empty kernel {empty:.2f}, 4-byte copy kernel {touch * 1e6:.2f}, "
          f"torch sum of [1, 32000] bf16 {read_sum * 1e6:.2f}, logit_stats cuda [1, 32000] bf16 {fused * 1e6:.2f}")


if __name__ == "__main__":
    {"kernel": kernel, "latency": latency}[sys.argv[1]]()
