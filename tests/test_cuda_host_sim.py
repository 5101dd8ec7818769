"""The CUDA kernel's per-thread accumulation (csrc/include/fusedecode/thread_sums.h), compiled for
the host and replayed the way one CTA deals a float32 row out to its threads
(tests/support/cuda_host_sim.cpp), against the float64 reference on the adversarial rows. Machines without
a GPU thus check the CUDA numerics too (the GPU run checks the kernel itself)."""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import fusedecode
from fusedecode.ops.logit_stats import OUTPUTS
from helpers import assert_close_to_reference
from support.adversarial_rows import LOGIT_CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
# One row of the simulator's output: the outputs every call computes, in table order, unpadded (the
# simulator writes them in the order of the C++ list, which tests/ops/test_registry.py keeps equal).
ALWAYS_OUTPUTS = [output for output in OUTPUTS if output.requested_by is None]
ROW_RECORD = np.dtype([(output.name, torch.empty(0, dtype=output.dtype).numpy().dtype) for output in ALWAYS_OUTPUTS])


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no C++ compiler on PATH")
    if not os.path.exists(os.path.join(ROOT, "csrc", "include", "fusedecode", "thread_sums.h")):
        pytest.skip("no source tree (csrc/) here: these tests run against an installed copy")
    binary = str(tmp_path_factory.mktemp("cuda_host_sim") / "cuda_host_sim")
    subprocess.run([COMPILER, "-O2", "-std=c++17", "-I", os.path.join(ROOT, "csrc", "include"),
                    os.path.join(ROOT, "tests", "support", "cuda_host_sim.cpp"), "-o", binary], check=True)
    return binary


def simulate(binary, tmp_path, logits, temperature):
    rows, vocab = logits.shape
    path_in, path_out = str(tmp_path / "in.bin"), str(tmp_path / "out.bin")
    with open(path_in, "wb") as handle:
        handle.write(np.array([rows, vocab], dtype=np.int64).tobytes())
        handle.write(temperature.numpy().astype(np.float32).tobytes())
        handle.write(logits.numpy().astype(np.float32).tobytes())
    subprocess.run([binary, path_in, path_out], check=True)
    records = np.fromfile(path_out, dtype=ROW_RECORD)
    assert records.shape == (rows,), f"the simulator wrote {records.shape[0]} records for {rows} rows"
    return fusedecode.LogitStats(**{output.name: torch.from_numpy(records[output.name].copy())
                                    for output in ALWAYS_OUTPUTS})


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_cuda_accumulation_on_adversarial_rows(simulator, tmp_path, case, generator):
    args = LOGIT_CASES[case](generator)
    logits = args["logits"].float()
    logits = logits.reshape(-1, logits.shape[-1])
    temperature = args.get("temperature", 1.0)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.float().reshape(-1)
    else:
        temperature = torch.full((logits.shape[0],), float(temperature))
    stats = simulate(simulator, tmp_path, logits, temperature)
    assert_close_to_reference(stats, logits, temperature=temperature, context=f"[cuda host sim {case}]")


@pytest.mark.parametrize("vocab", [1, 3, 4, 5, 1023, 4103, 70001])
def test_cuda_accumulation_random_rows(simulator, tmp_path, vocab, generator):
    # Rows whose max moves late (rescales), masked runs, far runs and a NaN row, across the
    # vector / batch / fold / tail boundaries of the kernel.
    logits = torch.randn((6, vocab), generator=generator) * 4
    logits[1] = torch.linspace(-30, 30, vocab)  # the max grows with every vector
    logits[2, ::3] = -math.inf
    logits[3, : vocab // 2] = -1e20
    logits[4, vocab // 3:] = torch.finfo(torch.float32).min
    logits[5, vocab - 1] = math.nan
    temperature = torch.tensor([1.0, 0.3, 2.0, 1e-6, 1e-38, 1.0])
    stats = simulate(simulator, tmp_path, logits, temperature)
    assert_close_to_reference(stats, logits, temperature=temperature, context=f"[cuda host sim V={vocab}]")
