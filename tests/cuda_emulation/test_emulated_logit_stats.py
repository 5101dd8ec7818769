"""The CUDA logit_stats kernel (csrc/include/fusedecode/logit_stats.cuh), executed on the CPU by the
emulator, against the float64 torch reference: one CTA per row and split rows (the last CTA of a
row merges), top-k 1..64, float32/float16/bfloat16, the adversarial rows of
tests/support/adversarial_rows.py.

Every call runs in the memory setups of ``emulator.RUNS`` (fenced buffers against either guard page,
two poison bytes) and each run is checked, so a read outside a buffer or of memory no kernel wrote
fails the test as surely as a wrong value.
"""

import math

import pytest
import torch

import fusedecode
from cuda_emulation.emulator import RUNS, every_memory
from helpers import assert_close_to_reference, float64_reference, random_logits
from support.adversarial_rows import LOGIT_CASES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def emulated_logit_stats(emulator, logits, *, temperature=1.0, token_ids=None, topk=0, splits=1,
                         vectors_per_split=0, runs=RUNS):
    """launch_logit_stats on ``logits`` ``[rows, V]`` (or ``[outer, inner, V]``), in every memory
    setup of ``runs``: one LogitStats per run, shaped like the leading dims."""
    rows3d = logits.unsqueeze(0) if logits.dim() == 2 else logits
    per_row = temperature.reshape(-1).float() if isinstance(temperature, torch.Tensor) else temperature
    ids = token_ids.reshape(-1) if token_ids is not None else None
    results = every_memory(lambda memory: emulator.logit_stats(
        rows3d, per_row, ids, topk, splits, vectors_per_split, memory=memory), runs)
    shape = logits.shape[:-1]
    return [fusedecode.LogitStats(**{k: v.view(shape) if v is not None else None for k, v in r.items()})
            for r in results]


def check(emulator, logits, context="", **kwargs):
    """Every run of the emulated kernel against the reference; returns the first run's stats."""
    reference_kwargs = {k: v for k, v in kwargs.items() if k in ("temperature", "token_ids", "topk")}
    results = emulated_logit_stats(emulator, logits, **kwargs)
    expected = float64_reference(logits, **reference_kwargs)
    for memory, stats in zip(RUNS, results):
        assert_close_to_reference(stats, logits, context=f"[emulated CUDA {context} {kwargs.get('splits', 1)} "
                                  f"CTAs/row, {memory}]", expected=expected, **reference_kwargs)
    return results[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab, splits", [(1, 1), (7, 1), (33, 1), (1000, 1), (4099, 1), (20000, 1), (4099, 2),
                                           (20000, 3), (9000, 16), (70001, 5)])
def test_random_rows(emulator, dtype, vocab, splits, generator):
    logits = random_logits((3, vocab), generator, dtype)
    logits[1] = logits[1].float().sort().values.to(dtype)  # the max moves with every vector (rescales)
    if vocab > 10:
        logits[2, ::3] = -math.inf
    token_ids = torch.randint(0, vocab, (3,), generator=generator)
    topk = int(torch.randint(1, 65, (), generator=generator))
    check(emulator, logits, token_ids=token_ids, topk=topk, splits=splits, context=f"{dtype} V={vocab} k={topk}")


def test_every_topk(emulator, generator):
    # k = 1..64 on rows where the warps' lists fill at different speeds (ascending, descending,
    # ties, fewer finite entries than k): each warp takes a different number of shuffles. Each k
    # runs once, alternating one CTA per row / three CTAs per row and the two memory setups.
    vocab = 1500
    logits = random_logits((4, vocab), generator)
    logits[1] = torch.linspace(-5, 5, vocab)
    logits[2] = torch.linspace(5, -5, vocab)
    logits[3] = -math.inf
    logits[3, torch.randperm(vocab, generator=generator)[:40]] = torch.randn(40, generator=generator).round()
    for topk in range(1, 65):
        splits = 1 if topk % 2 else 3
        memory = RUNS[(topk // 2) % len(RUNS)]
        stats = emulated_logit_stats(emulator, logits, topk=topk, splits=splits, runs=(memory,))[0]
        assert_close_to_reference(stats, logits, topk=topk, context=f"[k={topk}, {splits} CTAs/row, {memory}]")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_adversarial_rows(emulator, case, splits, generator):
    args = LOGIT_CASES[case](generator)
    logits = args.pop("logits")
    check(emulator, logits, splits=splits, context=case, **args)


def test_per_row_temperatures_and_invalid_ones(emulator, generator):
    # A per-row temperature the host did not check (CUDA graphs) turns its row into NaN in the kernel.
    logits = random_logits((6, 900), generator, dtype=torch.bfloat16)
    temperature = torch.tensor([0.7, 0.0, -1.0, math.nan, 2e-39, 1.5])
    for splits in (1, 2):
        stats = emulated_logit_stats(emulator, logits, temperature=temperature, topk=3, splits=splits)[0]
        invalid = torch.tensor([False, True, True, True, True, False])
        assert torch.isnan(stats.entropy).equal(invalid) and stats.argmax[invalid].eq(-1).all()
        valid = ~invalid
        assert_close_to_reference(fusedecode.LogitStats(*(f[valid] if f is not None else None for f in stats)),
                                  logits[valid], temperature=temperature[valid], topk=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_and_misaligned_rows(emulator, dtype, generator):
    # [B, T, V] slices with leading strides and a row start off the 16-byte grid (scalar head).
    base = random_logits((3, 5, 1203), generator, dtype)
    view = base[:, 1:4, 1:1202]
    assert view.stride() == (5 * 1203, 1203, 1)
    token_ids = torch.randint(0, 1201, (3, 3), generator=generator)
    for splits in (1, 2):
        check(emulator, view, token_ids=token_ids, topk=9, splits=splits, context="strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fixed_slices_as_verify_tree_cuts_them(emulator, dtype, generator):
    # verify_tree's statistics pass: 4096-token slices (vectors_per_split), the last one short.
    vocab = 3 * 4096 + 77
    logits = random_logits((2, vocab), generator, dtype)
    per_vector = 4 if dtype == torch.float32 else 8
    check(emulator, logits, topk=16, splits=4, vectors_per_split=4096 // per_vector, context="fixed slices")


def test_nan_and_inf_rows_in_split_mode(emulator, generator):
    logits = random_logits((4, 9000), generator)
    logits[0, 8999] = math.nan
    logits[1, 3] = math.inf
    logits[2] = -math.inf
    for splits in (1, 3):
        stats = check(emulator, logits, topk=4, splits=splits, context="poisoned rows")
        assert stats.argmax[:3].tolist() == [-1, -1, -1] and stats.argmax[3] >= 0
