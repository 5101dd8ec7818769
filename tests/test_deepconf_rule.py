"""DeepConf's window rule, one definition (``fusedecode.confidence``: ``window_parts``,
``window_mean``, ``group_confidences``, ``stop_position``) shared by the offline functions, the Hugging
Face early stop and the vLLM processor's device windows: each against an independent per-window
transcription of the official ``np.mean`` of each window, on traces holding NaN, +inf and -inf."""

import math

import numpy as np
import pytest
import torch

from fusedecode.confidence import group_confidences, stop_position
from fusedecode.hf.processors import ConfidenceStopProcessor
from fusedecode.vllm._traces import TraceTable
from fusedecode.vllm._windows import ConfidenceWindows


def window_mean_reference(values):
    """One window's mean as numpy's mean of it (the official per-window ``np.mean``), in float64."""
    with np.errstate(invalid="ignore"):
        return float(np.mean(np.asarray(values, np.float64)))


def hostile_trace(generator, length, kinds):
    values = list(generator.uniform(0.5, 4.0, size=length))
    for kind in kinds:
        values[int(generator.integers(0, length))] = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    return values


TRACE_KINDS = [(), ("nan",), ("+inf",), ("-inf",), ("+inf", "-inf"), ("nan", "-inf"), ("nan", "nan", "+inf")]


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= 1e-12 * max(1.0, abs(b))


@pytest.mark.parametrize("kinds", TRACE_KINDS)
def test_group_confidences_are_each_windows_own_mean(kinds):
    generator = np.random.default_rng(len(kinds))
    for window in (1, 2, 3, 7):
        for length in (1, 5, 12):
            values = hostile_trace(generator, length, kinds)
            got = group_confidences(values, window)
            size = min(window, length)
            want = [window_mean_reference(values[g:g + size]) for g in range(length - size + 1)]
            assert len(got) == len(want) and all(same(a, b) for a, b in zip(got.tolist(), want)), (window, values)


def transcribed_stop(values, window, threshold):
    for g in range(window - 1, len(values)):
        if window_mean_reference(values[g - window + 1:g + 1]) < threshold:  # NaN compares False
            return g
    return None


@pytest.mark.parametrize("kinds", TRACE_KINDS)
def test_stop_position_is_the_first_full_window_below(kinds):
    generator = np.random.default_rng(10 + len(kinds))
    for window in (1, 2, 4):
        for _ in range(5):
            values = hostile_trace(generator, 14, kinds)
            threshold = float(generator.uniform(1.5, 3.0))
            assert stop_position(values, window, threshold) == transcribed_stop(values, window, threshold)
    with pytest.raises(ValueError, match="window"):
        stop_position([1.0], 0, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        stop_position([1.0], 1, "low")


class _Options:
    def __init__(self, window, threshold):
        self.temperature, self.topk, self.window, self.threshold = 1.0, 5, window, threshold


@pytest.mark.parametrize("kinds", TRACE_KINDS)
@pytest.mark.parametrize("rows_per_step", [1, 3])
def test_vllm_device_windows_follow_stop_position(kinds, rows_per_step):
    """Each trace's positions fed in steps of up to ``rows_per_step`` rows (speculative rows), every
    row's decision equal to whether its window is below the threshold (``stop_position``'s test)."""
    generator = np.random.default_rng(20 + len(kinds) + rows_per_step)
    table = TraceTable("cpu")
    windows = ConfidenceWindows("cpu", spare_rows=rows_per_step)
    traces = []
    for _ in range(4):
        window = int(generator.integers(1, 5))
        values = [float(v) for v in np.float32(hostile_trace(generator, 16, kinds))]  # the engine's float32
        threshold = float(generator.uniform(1.5, 3.0))
        row = table.take(_Options(window, threshold), 2, 0, 0)
        # Every position whose full window is below: the rule stops at the first, the engine ends there.
        stops = {g for g in range(window - 1, 16) if window_mean_reference(values[g - window + 1:g + 1]) < threshold}
        traces.append((row, values, stops))
    windows.reserve(table.capacity, 5)
    position, checked = 0, 0
    while position < 16:
        count = min(int(generator.integers(1, rows_per_step + 1)), 16 - position)
        tables = [row for row, _, _ in traces for _ in range(count)]
        positions = [position + j for _ in traces for j in range(count)]
        values = [values[position + j] for _, values, _ in traces for j in range(count)]
        stop = windows.decide(table.on_device(), torch.tensor(tables), torch.tensor(positions),
                              torch.tensor(values, dtype=torch.float32), torch.zeros(len(tables)))
        for flag, (row, _, stops), g in zip(stop.tolist(), [t for t in traces for _ in range(count)], positions):
            assert flag == (g in stops), (kinds, row, g)
            checked += 1
        position += count
    assert checked == 64


def test_hf_early_stop_resumes_after_a_nan_window():
    """A NaN confidence (a NaN logits row) blocks only the windows that hold it: the row stops at the
    first later window below the threshold, where the offline rule says."""
    vocab, window, eos = 9, 3, 0
    generator = torch.Generator().manual_seed(3)
    steps = [torch.randn(2, vocab, generator=generator) * 2 for _ in range(12)]
    steps[1][0] = math.nan  # row 0: a NaN distribution at its second step
    for scores in steps:
        scores[:, eos] = -5.0  # EOS possible, never chosen unless forced
    free = ConfidenceStopProcessor(window, 1e-9, 4, [eos])
    input_ids = torch.ones(2, 1, dtype=torch.long)
    for scores in steps:
        free(input_ids, scores.clone())
        input_ids = torch.cat([input_ids, torch.ones(2, 1, dtype=torch.long)], dim=1)
    history = free.history("topk_confidence")[0].double().numpy()
    assert math.isnan(history[1])
    threshold = float(np.nanmax(group_confidences(history[4:], window))) + 1e-6  # every window after the NaN
    expected = stop_position(history, window, threshold)
    assert expected == 4, "the first window after the NaN ones is below the threshold"
    stopping = ConfidenceStopProcessor(window, threshold, 4, [eos])
    input_ids = torch.ones(2, 1, dtype=torch.long)
    for step, scores in enumerate(steps):
        out = stopping(input_ids, scores.clone())
        if step == expected:
            assert torch.isinf(out[0, 1:]).all() and out[0, eos] == -5.0, "row 0 emits EOS here"
            break
        assert not torch.isinf(out[0]).any(), f"row 0 stopped early at {step}"
        input_ids = torch.cat([input_ids, torch.ones(2, 1, dtype=torch.long)], dim=1)
