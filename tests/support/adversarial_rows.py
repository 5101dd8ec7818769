"""The hostile logit rows every backend's logit_stats must get right (test_adversarial.py runs them on
every backend; test_cuda.py, test_cuda_host_sim.py and the emulated CUDA kernels run them too).

``LOGIT_CASES`` maps a case name to a function of a torch.Generator returning the keyword arguments
of one ``logit_stats`` call (``logits``, and ``temperature``, ``token_ids``, ``topk`` where the case
needs them), on the CPU.
"""

import math

import torch

from helpers import random_logits

F32 = torch.finfo(torch.float32)
F16 = torch.finfo(torch.float16)
BF16 = torch.finfo(torch.bfloat16)


def case_far_negative(generator, far):
    """Far entries after the max, before it (a rescale from a far running max), interleaved, and
    spread across chunks and slices."""
    x = random_logits((4, 5000), generator)
    x[0, 100:] = far
    x[1, :4900] = far
    x[2, ::2] = far
    x[3, 1000:4000] = far
    return dict(logits=x, token_ids=torch.tensor([5, 4950, 0, 2000]), topk=5)


def case_only_one_finite_like(generator):
    """All entries finfo.min but one (at the start, middle, end), and a row of finfo.min only."""
    x = torch.full((4, 5000), F32.min)
    x[0, 0] = 0.0
    x[1, 2500] = -7.5
    x[2, 4999] = 12.0
    return dict(logits=x, token_ids=torch.tensor([0, 7, 4999, 3]), topk=64)


def case_near_float_max(generator):
    """100 entries at 3.4e38 (self_certainty 0, topk_confidence log 100), finfo.max, and rows mixing
    +-finfo.max, whose differences overflow float32 while mean(z) - max z still fits (70/30, 60/40)
    or does not (20/80: self_certainty is +inf in float32 too)."""
    rows = [torch.full((100,), 3.4e38), torch.full((100,), F32.max)]
    for share_max in (70, 60, 20):
        row = torch.full((100,), F32.min)
        row[torch.randperm(100, generator=generator)[:share_max]] = F32.max
        rows.append(row)
    logits = torch.stack(rows)
    far = [int(torch.nonzero(row == F32.min)[0]) for row in rows[2:]]
    return dict(logits=logits, token_ids=torch.tensor([0, 99] + far), topk=5)


def case_float_max_spread_temperatures(generator):
    """Gaps of -FLT_MAX - FLT_MAX (overflowing float32) under temperatures above and below 1, where
    the scaled gap is finite again (T = 30) or stays beyond the range (T = 0.5)."""
    row = torch.tensor([F32.max, -3e38, 1.0, 65504.0, F32.max, F32.min, 0.0, -1e20, 3e38])
    logits = torch.stack([row, row.flip(0), row, row.roll(3), row])
    temperature = torch.tensor([30.0, 2.5, 1e30, 0.5, 3e38])
    return dict(logits=logits, temperature=temperature, token_ids=torch.tensor([1, 2, 5, 0, 7]), topk=4)


def case_mixed_1e30(generator):
    x = random_logits((3, 3000), generator)
    signs = torch.where(torch.rand((3, 3000), generator=generator) < 0.5, -1.0, 1.0)
    x[0] = signs[0] * 1e30
    x[1, ::3] = signs[1, ::3] * 1e30
    x[2, :] = -1e30
    x[2, 1234] = 1e30
    return dict(logits=x, token_ids=torch.tensor([0, 1, 1234]), topk=8)


def case_large_offsets(generator):
    """1e6 + noise (self_certainty and token_logprob as differences of large numbers)."""
    x = random_logits((4, 5000), generator, scale=1.0)
    x[0] += 1e6
    x[1] -= 1e6
    x[2] = x[2] * 1e3 + 1e9
    x[3] = x[3] * 1e24 + 1e30
    return dict(logits=x, token_ids=torch.tensor([0, 17, 4999, 2]), topk=10)


def case_ties_1e30(generator):
    x = torch.zeros((3, 50))
    x[0, :3] = 1e30
    x[1] = 1e30
    x[2, [4, 9]] = -1e30
    x[2, [1, 2]] = 1e30
    return dict(logits=x, token_ids=torch.tensor([0, 7, 1]), topk=3)


def case_tiny_temperature(generator):
    x = torch.tensor([[1.0, 1.0 + 1e-6, 1.0 - 1e-6, 0.0]] * 2)
    return dict(logits=x, temperature=1e-6, token_ids=torch.tensor([0, 2]), topk=2)


def case_temperature_extremes(generator):
    """One row per temperature near the edges of the float32 range, with ordinary and far logits."""
    x = random_logits((6, 700), generator)
    x[1, 350:] = -1e20
    x[4] *= 1e30
    x[5, :10] = F32.max
    temperature = torch.tensor([3.5e-39, 1e-38, 1e-6, 1e30, 3e38, 0.5])
    return dict(logits=x, temperature=temperature, token_ids=torch.tensor([0, 351, 5, 6, 7, 11]), topk=4)


def case_float64_temperature_rows(generator):
    x = random_logits((3, 2, 900), generator)
    x[0, 1, 300:] = F32.min
    x[2, 0] += 1e6
    temperature = torch.tensor([[1e-30, 1.0], [2.5, 1e20], [1e-3, 7.0]], dtype=torch.float64)
    return dict(logits=x, temperature=temperature, topk=6)


def case_subnormal(generator):
    x = random_logits((3, 2000), generator, scale=1e-40)  # float32 subnormals
    x[2, 1000:] = -1e20
    return dict(logits=x, temperature=torch.tensor([1.0, 1e-38, 3e-39]), token_ids=torch.tensor([3, 4, 5]),
                topk=7)


def case_fp16_extremes(generator):
    x = random_logits((3, 4000), generator).half()
    x[0, ::7] = -F16.max
    x[1, :] = F16.max
    x[1, 100:200] = -F16.max
    x[2, 5] = F16.max
    x[2, 6] = -F16.max
    return dict(logits=x, token_ids=torch.tensor([0, 150, 6]), topk=9)


def case_bf16_extremes(generator):
    x = random_logits((3, 4000), generator).bfloat16()
    x[0, 10:] = BF16.min
    x[1, ::2] = BF16.max
    x[1, 1::2] = BF16.min
    x[2] = x[2] * 1e30
    return dict(logits=x, token_ids=torch.tensor([10, 1, 3]), topk=64)


def case_single_entry_rows(generator):
    x = torch.tensor([[F32.min], [F32.max], [1e-45], [-1e20], [0.0]])
    return dict(logits=x, token_ids=torch.zeros(5, dtype=torch.int64), topk=64)


def case_few_finite_topk(generator):
    """topk larger than the number of finite entries, which are far apart."""
    x = torch.full((3, 3000), -math.inf)
    x[0, [3, 10]] = torch.tensor([-1e20, 5.0])
    x[1, [0, 2999, 1500]] = torch.tensor([F32.min, F32.max, 0.0])
    x[2, 7] = 1e30
    return dict(logits=x, token_ids=torch.tensor([3, 1500, 8]), topk=64)


def case_split_vocab(generator):
    """Long rows read in several slices (threads / CTAs / programs): the max in a late slice after
    far slices, far slices after it, finfo.min blocks between."""
    vocab = 70000
    x = random_logits((2, vocab), generator)
    x[0, :40000] = -1e20
    x[0, 60000:] = F32.min
    x[1, 20000:] = F32.min
    x[1, 50000] = 30.0
    return dict(logits=x, token_ids=torch.tensor([100, 50000]), topk=16)


def case_split_vocab_one_row(generator):
    """One long row: the cpp backend splits it across threads, the GPU across CTAs / programs."""
    x = random_logits((1, 70000), generator)
    x[0, :30000] = F32.min
    x[0, 30000:45000] = -1e20
    x[0, 69000:] = F32.min
    return dict(logits=x, token_ids=torch.tensor([12]), topk=8)


LOGIT_CASES = {
    "far_-1e20": lambda g: case_far_negative(g, -1e20),
    "far_finfo_min": lambda g: case_far_negative(g, F32.min),
    "far_-1e38": lambda g: case_far_negative(g, -1e38),
    "one_finite_among_finfo_min": case_only_one_finite_like,
    "near_float_max": case_near_float_max,
    "float_max_spread_temperatures": case_float_max_spread_temperatures,
    "mixed_1e30": case_mixed_1e30,
    "large_offsets": case_large_offsets,
    "ties_1e30": case_ties_1e30,
    "tiny_temperature": case_tiny_temperature,
    "temperature_extremes": case_temperature_extremes,
    "float64_temperature_rows": case_float64_temperature_rows,
    "subnormal": case_subnormal,
    "fp16_extremes": case_fp16_extremes,
    "bf16_extremes": case_bf16_extremes,
    "single_entry_rows": case_single_entry_rows,
    "few_finite_topk": case_few_finite_topk,
    "split_vocab": case_split_vocab,
    "split_vocab_one_row": case_split_vocab_one_row,
}
