"""Reasoning steps: a trace cut at delimiter token sequences, and per-step measures of any recorded
per-token field (entropy, self-certainty, DeepConf's ``topk_confidence``, ...). Framework-free: torch
only, no transformers or vLLM, so that ``fusedecode.hf``, the vLLM integration and offline analysis
share one definition.

**Steps.** ``delimiters`` is a list of token-id sequences (each a non-empty sequence of ints, or one
int for a single-token delimiter). A trace is read left to right from its first generated token; a
step ends at the first token at which some delimiter occurs entirely inside the current step (its
first token at or after the step's first token). **The delimiter's tokens belong to the step they
end**, and the next step starts with the following token. Occurrences never overlap a step
boundary: as ``str.split``, with delimiter ``"\\n\\n"`` the text ``"a\\n\\n\\nb"`` gives the steps
``"a\\n\\n"`` and ``"\\nb"``. Where several delimiters could end at the same or at different
tokens, the earliest end wins, so a delimiter that starts with a shorter one never matches. The
trace's last tokens after the last delimiter form one more step, flagged ``terminated=False``; an
empty trace has no step. The prompt never belongs to a step and never completes a delimiter.

**Measures** of one field over a step's tokens (the value recorded for token t is the statistic of the
distribution token t was drawn from):

- ``count``: tokens in the step, delimiter included;
- ``mean``: the sum of its values in token order, accumulated in float64 from 0.0 one value at a
  time, divided by ``count``;
- ``min``: the smallest value;
- ``tail``: the mean of the step's last ``min(tail, count)`` values, summed in the same way.

All are float64 (count int64). NaN in gives NaN out for that step only: a NaN value makes the step's
``mean`` and ``min`` NaN, and its ``tail`` NaN when it lies in the last ``tail`` tokens. The fixed
summation order is what lets the online accumulators below (``StepAccumulator``) give exactly, bit
for bit, what the offline ``step_statistics`` gives.

Offline (recorded histories, 1-D per trace, e.g. ``UncertaintyProcessor.traces(...)``):
``cut_steps`` and ``step_statistics`` (also exported from ``fusedecode.confidence``).

Online (on the device, one token per row at a time, no host synchronisation): pure functions over
small per-row state tuples, for the engine-side integrations, which keep the state per request and
call them once per decode step:

- ``DelimiterTable.build(delimiters, device)``; ``new_cutter(batch, table, device)`` and
  ``cut_step(table, state, tokens, rows)``: which rows' step the token just emitted ends;
- ``new_accumulator(batch, fields, tail, device)``, ``accumulate(state, values, rows)``,
  ``restart_steps(state, rows)`` and ``step_measure(state, measure, field, tail)``: the measures of
  each row's current step.
"""

import math
from typing import NamedTuple

import torch

from ._validation import ArgumentTypeError, check_int

__all__ = ["MEASURES", "DEFAULT_TAIL", "check_delimiters", "StepSpans", "StepStatistics", "cut_steps",
           "step_statistics", "statistics_of_spans", "spans_from_step_indices", "DelimiterTable", "CutterState",
           "new_cutter", "cut_step", "AccumulatorState", "new_accumulator", "accumulate", "restart_steps",
           "step_measure"]

MEASURES = ("count", "mean", "min", "tail")
DEFAULT_TAIL = 8  # tokens: about a step's conclusion (e.g. "+0=12;" in the bundled model's answers)


def check_delimiters(delimiters, name="delimiters"):
    """The delimiters as a tuple of non-empty tuples of token ids (ints >= 0).

    A list whose items are ints or sequences of ints: an int is a single-token delimiter, a sequence
    one multi-token delimiter (``[271, [13, 271]]``: ``271`` alone, or ``13`` then ``271``). A token
    tensor or NumPy array is read the same way (its rows, or its values for a 1-D one).

    Example::

        >>> check_delimiters([5, [7, 8]])
        ((5,), (7, 8))
    """
    if isinstance(delimiters, (str, bytes)) or not hasattr(delimiters, "__iter__"):
        raise ArgumentTypeError(f"{name} must be a list of token ids or of token-id sequences, "
                                f"got {type(delimiters).__name__}")
    result = []
    for index, item in enumerate(delimiters.tolist() if hasattr(delimiters, "tolist") else delimiters):
        sequence = (item,) if not hasattr(item, "__iter__") or isinstance(item, (str, bytes)) else tuple(item)
        if not sequence:
            raise ValueError(f"{name}[{index}] is empty: a delimiter has at least one token")
        result.append(tuple(check_int(f"{name}[{index}]", token, 0) for token in sequence))
    if not result:
        raise ValueError(f"{name} is empty: give at least one delimiter")
    return tuple(result)


class StepSpans(NamedTuple):
    """The steps of one trace: ``start`` and ``end`` (exclusive) token indices and ``terminated``
    (False for a last step with no delimiter), 1-D CPU tensors (int64, int64, bool) of one entry per
    step."""

    start: torch.Tensor
    end: torch.Tensor
    terminated: torch.Tensor


class StepStatistics(NamedTuple):
    """Per-step measures of one field over one trace, 1-D CPU tensors of one entry per step: ``start``
    (index of the step's first token), ``count`` (int64), ``terminated`` (bool), then ``mean``,
    ``min`` and ``tail`` (float64); see the module docstring for the exact definitions."""

    start: torch.Tensor
    count: torch.Tensor
    terminated: torch.Tensor
    mean: torch.Tensor
    min: torch.Tensor
    tail: torch.Tensor


def _token_list(name, tokens):
    """A 1-D sequence of token ids as a list of Python ints."""
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu()
    values = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    if any(isinstance(value, list) for value in values):
        raise ValueError(f"{name} must be a 1-D sequence of token ids")
    return [check_int(name, value, -2**63) for value in values]


def _value_list(name, values):
    """A 1-D sequence of floats as a list of Python floats (float32 tensors are widened exactly)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double()
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if any(isinstance(value, list) for value in values):
        raise ValueError(f"{name} must be a 1-D sequence of floats")
    return [float(value) for value in values]


def cut_steps(tokens, delimiters):
    """The steps of one trace (see the module docstring): a ``StepSpans``.

    ``tokens``: the generated token ids (a 1-D tensor, list or array, no prompt).

    Example::

        >>> cut_steps([4, 9, 9, 9, 5], delimiters=[[9, 9]])
        StepSpans(start=tensor([0, 3]), end=tensor([3, 5]), terminated=tensor([ True, False]))
    """
    tokens = _token_list("tokens", tokens)
    delimiters = check_delimiters(delimiters)
    starts, ends, terminated = [], [], []
    start = 0
    for position in range(len(tokens)):
        length = position - start + 1
        if any(len(d) <= length and tuple(tokens[position - len(d) + 1:position + 1]) == d for d in delimiters):
            starts.append(start)
            ends.append(position + 1)
            terminated.append(True)
            start = position + 1
    if start < len(tokens):
        starts.append(start)
        ends.append(len(tokens))
        terminated.append(False)
    return StepSpans(torch.tensor(starts, dtype=torch.int64), torch.tensor(ends, dtype=torch.int64),
                     torch.tensor(terminated, dtype=torch.bool))


def _ordered_sum(values):
    """Sum in order, from 0.0, one float64 addition at a time (the online accumulators' order)."""
    total = 0.0
    for value in values:
        total += value
    return total


def _minimum(values):
    return math.nan if any(math.isnan(value) for value in values) else min(values)


def statistics_of_spans(values, spans, tail=DEFAULT_TAIL):
    """``StepStatistics`` of ``values`` (one float per token of the trace) over given ``spans`` (a
    ``StepSpans``, from ``cut_steps`` or from step indices found online)."""
    tail = check_int("tail", tail, 1)
    values = _value_list("values", values)
    if len(spans.start) and int(spans.end[-1]) > len(values):
        raise ValueError(f"values has {len(values)} entries but the steps cover {int(spans.end[-1])} tokens")
    means, minima, tails = [], [], []
    for start, end in zip(spans.start.tolist(), spans.end.tolist()):
        step = values[start:end]
        means.append(_ordered_sum(step) / len(step))
        minima.append(_minimum(step))
        last = step[-tail:]
        tails.append(_ordered_sum(last) / len(last))
    as_float = dict(dtype=torch.float64)
    return StepStatistics(spans.start, spans.end - spans.start, spans.terminated, torch.tensor(means, **as_float),
                          torch.tensor(minima, **as_float), torch.tensor(tails, **as_float))


def step_statistics(values, tokens, delimiters, *, tail=DEFAULT_TAIL):
    """Per-step measures of one recorded field over one trace: a ``StepStatistics``.

    ``values``: the field's history over the trace's generated tokens (1-D, e.g. an entry of
    ``UncertaintyProcessor.traces("entropy", ...)``); ``tokens``: the same tokens' ids (same length);
    ``delimiters``: see the module docstring; ``tail``: tokens of the ``tail`` measure (>= 1).

    Example::

        >>> stats = step_statistics([1.0, 3.0, 2.0, 5.0], [7, 0, 7, 7], delimiters=[0])
        >>> stats.count.tolist(), stats.mean.tolist(), stats.min.tolist(), stats.terminated.tolist()
        ([2, 2], [2.0, 3.5], [1.0, 2.0], [True, False])
        >>> step_statistics([1.0, 3.0, 2.0, 5.0], [7, 0, 7, 7], [0], tail=1).tail.tolist()
        [3.0, 5.0]
    """
    spans = cut_steps(tokens, delimiters)
    covered = int(spans.end[-1]) if len(spans.end) else 0
    count = len(_value_list("values", values))
    if count != covered:
        raise ValueError(f"values ({count}) and tokens ({covered}) differ in length")
    return statistics_of_spans(values, spans, tail)


def spans_from_step_indices(step_index, last_terminated):
    """``StepSpans`` of a trace from the step index of each token (0, 0, 1, 1, 1, 2, ...: what the
    online cutter gives) and whether its last token ends a step."""
    step_index = step_index.detach().cpu().to(torch.int64).reshape(-1)
    if step_index.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepSpans(empty, empty, torch.zeros(0, dtype=torch.bool))
    new_step = torch.ones_like(step_index, dtype=torch.bool)
    new_step[1:] = step_index[1:] != step_index[:-1]
    start = new_step.nonzero().flatten()
    end = torch.cat([start[1:], torch.tensor([step_index.numel()])])
    terminated = torch.ones_like(start, dtype=torch.bool)
    terminated[-1] = bool(last_terminated)
    return StepSpans(start, end, terminated)


# ------------------------------------------------------------------------------------------------
# Online: device-side state, one token per row per call


class DelimiterTable(NamedTuple):
    """The delimiters on a device: ``tokens`` ``[D, L]`` int64, each delimiter right-aligned in a row
    of ``L`` (the longest delimiter's length), ``valid`` ``[D, L]`` bool where a row holds a token,
    and ``lengths`` ``[D]`` int64."""

    tokens: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def build(cls, delimiters, device="cpu"):
        delimiters = check_delimiters(delimiters)
        longest = max(map(len, delimiters))
        tokens = torch.zeros(len(delimiters), longest, dtype=torch.int64)
        valid = torch.zeros(len(delimiters), longest, dtype=torch.bool)
        for row, delimiter in enumerate(delimiters):
            tokens[row, longest - len(delimiter):] = torch.tensor(delimiter)
            valid[row, longest - len(delimiter):] = True
        lengths = torch.tensor([len(d) for d in delimiters], dtype=torch.int64)
        return cls(tokens.to(device), valid.to(device), lengths.to(device))

    @property
    def longest(self):
        return self.tokens.shape[1]


class CutterState(NamedTuple):
    """Per row: ``recent`` ``[B, L]`` the last ``L`` tokens (newest last), ``length`` ``[B]`` the
    tokens of the current step so far, ``index`` ``[B]`` the current step's index (0 for the first)."""

    recent: torch.Tensor
    length: torch.Tensor
    index: torch.Tensor


def new_cutter(batch, table, device):
    """A ``CutterState`` before the first generated token."""
    return CutterState(torch.full((batch, table.longest), -1, dtype=torch.int64, device=device),
                       torch.zeros(batch, dtype=torch.int64, device=device),
                       torch.zeros(batch, dtype=torch.int64, device=device))


def cut_step(table, state, tokens, rows=None):
    """Adds the token each row just emitted (``tokens`` ``[B]``) to its current step; returns
    ``(state, ends)``, ``ends`` ``[B]`` bool: the token completes a delimiter inside the step, which
    ends there (the state's step then restarts empty with ``index + 1``). Rows outside ``rows`` (a
    ``[B]`` bool, default all) are left unchanged and never end a step."""
    tokens = tokens.to(torch.int64)
    recent = torch.cat([state.recent[:, 1:], tokens.unsqueeze(1)], dim=1)
    length = state.length + 1
    matches = ((recent.unsqueeze(1) == table.tokens) | ~table.valid).all(dim=2)  # [B, D]
    ends = (matches & (table.lengths <= length.unsqueeze(1))).any(dim=1)
    if rows is not None:
        ends = ends & rows
        recent = torch.where(rows.unsqueeze(1), recent, state.recent)
        length = torch.where(rows, length, state.length)
    return CutterState(recent, torch.where(ends, 0, length), state.index + ends.long()), ends


class AccumulatorState(NamedTuple):
    """Per row, over the current step: ``count`` ``[B]`` tokens, ``total`` ``[B, F]`` float64 ordered
    sums, ``minimum`` ``[B, F]`` float32, ``recent`` ``[B, F, R]`` float32 the trace's last ``R``
    values (newest last; entries before the step are masked when measured)."""

    count: torch.Tensor
    total: torch.Tensor
    minimum: torch.Tensor
    recent: torch.Tensor


def new_accumulator(batch, fields, tail, device):
    """An empty ``AccumulatorState`` for ``fields`` values per token, keeping the last ``tail``
    values (0 when no ``tail`` measure is asked for)."""
    return AccumulatorState(torch.zeros(batch, dtype=torch.int64, device=device),
                            torch.zeros(batch, fields, dtype=torch.float64, device=device),
                            torch.full((batch, fields), math.inf, dtype=torch.float32, device=device),
                            torch.zeros(batch, fields, tail, dtype=torch.float32, device=device))


def accumulate(state, values, rows):
    """Adds one token's ``values`` ``[B, F]`` (float32) to the current step of ``rows`` ``[B]``."""
    values = values.to(torch.float32)
    keep = rows.unsqueeze(1)
    recent = torch.cat([state.recent[:, :, 1:], values.unsqueeze(2)], dim=2) if state.recent.shape[2] else state.recent
    return AccumulatorState(state.count + rows.long(),
                            torch.where(keep, state.total + values.double(), state.total),
                            torch.where(keep, torch.minimum(state.minimum, values), state.minimum),
                            torch.where(keep.unsqueeze(2), recent, state.recent))


def restart_steps(state, rows):
    """Empties the current step of ``rows`` ``[B]`` (its last values stay in ``recent``, masked)."""
    return AccumulatorState(torch.where(rows, 0, state.count),
                            torch.where(rows.unsqueeze(1), 0.0, state.total),
                            torch.where(rows.unsqueeze(1), math.inf, state.minimum),
                            state.recent)


def step_measure(state, measure, field, tail=DEFAULT_TAIL):
    """``[B]`` float64: ``measure`` (one of ``MEASURES``) of value ``field`` (an index) over each
    row's current step, exactly as ``step_statistics`` computes it (NaN for an empty step's mean and
    tail, +inf for its min). ``tail`` must not exceed the ``tail`` the state was made with."""
    if measure == "count":
        return state.count.double()
    if measure == "mean":
        return state.total[:, field] / state.count
    if measure == "min":
        return state.minimum[:, field].double()
    if measure != "tail":
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    kept = state.recent.shape[2]
    if not 1 <= tail <= kept:
        raise ValueError(f"tail must be in [1, {kept}] (the values this state keeps), got {tail}")
    taken = state.count.clamp(max=tail)
    total = torch.zeros_like(state.total[:, field])
    # The last `taken` values in token order, summed one at a time from 0.0 as offline: adding 0.0
    # for the masked older entries leaves the sum unchanged, bit for bit.
    for age in range(tail - 1, -1, -1):
        value = state.recent[:, field, kept - 1 - age].double()
        total = total + torch.where(age < taken, value, 0.0)
    return total / taken
