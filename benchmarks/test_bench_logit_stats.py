"""pytest-benchmark suite for logit_stats: fused backends against the torch composites.

    pytest benchmarks --benchmark-only                 # CPU shapes; GPU shapes too when CUDA is present
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Wall-clock timing (pytest-benchmark); on the GPU each call synchronises. For CUDA-event timings
with L2 rotation and the copy-bandwidth floor, use benchmarks/sweep.py.
"""

import functools

import pytest
import torch

import fusedecode
from fusedecode import _bench
from fusedecode.backends import unavailable_reason

SHAPES = {"cpu": [(64, 32000, torch.float32), (8, 151936, torch.bfloat16)],
          "cuda": [(1, 151936, torch.bfloat16), (32, 128256, torch.bfloat16), (256, 32000, torch.float32)]}


def implementations(device):
    impls = {f"fused:{b}": functools.partial(fusedecode.logit_stats, backend=b)
             for b in ("cuda", "triton", "cpp") if unavailable_reason(b, device) is None}
    impls["torch"] = functools.partial(fusedecode.logit_stats, backend="torch")
    impls["torch-min"] = _bench.minimal_torch_composite
    return impls


def cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for rows, vocab, dtype in SHAPES[device]:
            for name in implementations(device):
                yield pytest.param(device, rows, vocab, dtype, name,
                                   id=f"{device}-{name}-{rows}x{vocab}-{str(dtype).split('.')[-1]}")


@pytest.mark.parametrize("device,rows,vocab,dtype,impl", list(cases()))
def test_logit_stats(benchmark, device, rows, vocab, dtype, impl):
    fn = implementations(device)[impl]
    inputs = _bench.make_inputs(rows, vocab, dtype, device, copies=2)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = {"i": 0}

    def call():
        state["i"] += 1
        out = fn(inputs[state["i"] % 2])
        sync()
        return out

    call()
    benchmark.extra_info["bytes"] = rows * vocab * inputs[0].element_size()
    benchmark(call)
