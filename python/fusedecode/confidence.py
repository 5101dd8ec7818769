"""Trace-level confidence and voting over recorded per-token histories, with no dependency on
transformers (shared by ``fusedecode.hf`` and the vLLM integration, which record the histories).

DeepConf (Fu et al., 2025, "Deep Think with Confidence"): a token's confidence is DeepConf's
``topk_confidence``, minus the mean of the k largest log-probabilities (``logit_stats(..., topk=20)``;
high means confident). Over a trace:

- group confidence: the mean token confidence over a sliding window of ``window`` tokens (one group,
  the mean of all tokens, when the trace is shorter than the window). Each window's mean is its own,
  as the official per-window ``np.mean``: NaN if the window holds a NaN or both infinities, +-inf if
  it holds infinities of one sign, and a non-finite value never leaks into the windows after it;
- the online early stop (``stop_position``; ``fusedecode.hf.ConfidenceStopping`` and the vLLM
  processor apply it token by token): the first token at which the group confidence of the last
  ``window`` tokens, once there are ``window``, is below a threshold. The window's mean is computed
  from its parts (``window_parts``, ``window_mean``) by all three, so they agree on every input;
- ``mean_confidence``, ``tail_confidence`` (the last ``tail`` tokens), ``bottom_group_confidence`` (mean
  of the lowest ``bottom`` fraction of group confidences) and ``lowest_group_confidence``;
- ``confidence_threshold``: the online stop threshold calibrated on warm-up traces, a percentile of
  their lowest group confidences (``keep_percent=10``: DeepConf-low, ``90``: DeepConf-high);
- ``filter_top``: the traces in the top fraction by a confidence; ``weighted_majority_vote`` and
  ``deepconf_vote`` (the online vote: traces whose lowest group confidence reaches the threshold,
  weighted by it).

Self-certainty Best-of-N (Kang et al., 2025): ``best_of_n``, Borda voting by self-certainty rank.

Reasoning steps (re-exported from ``fusedecode.steps`` and ``fusedecode.reflection``, where their exact
rules are written): ``cut_steps`` and ``step_statistics`` (per-step count, mean, min and tail of any
recorded field, the steps cut at delimiter token sequences), and ``insertion_points`` (where the
reflection insertion rule inserts in a recorded trace).

Each function follows the authors' code (facebookresearch/deepconf: ``deepconf/utils.py``,
``deepconf/wrapper.py``; backprop07/Self-Certainty: ``src/voting_from_list.py``), tie-breaking
included; the docstrings say where. The official DeepConf code rounds token confidences and group
means to 3 decimals when it stores them; these functions do not round. Histories are 1-D sequences of
floats (lists, tuples, NumPy arrays, 1-D tensors), computed in float64. NaN in gives NaN out; an empty
trace has no confidence (NaN).
"""

import math
from numbers import Real

import numpy as np
import torch

from .reflection import insertion_points
from .steps import StepStatistics, cut_steps, step_statistics

__all__ = ["group_confidences", "stop_position", "window_parts", "window_mean", "mean_confidence", "tail_confidence", "bottom_group_confidence",
           "lowest_group_confidence", "confidence_threshold", "filter_top", "weighted_majority_vote",
           "majority_vote", "deepconf_vote", "best_of_n", "cut_steps", "step_statistics", "StepStatistics",
           "insertion_points"]

DEEPCONF_WINDOW = 2048  # the paper's group size (tokens)


def _history(name, values):
    """A 1-D float64 NumPy array of a recorded history (tensors are moved to the CPU)."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of floats, got shape {array.shape}")
    return array


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    return float(value)


def window_parts(values):
    """What the sum of a window of ``values`` (a float tensor, any shape) is made of: the finite values
    (float64, 0 where not finite) and, in a last dimension of 3, int64 indicators of NaN, +inf and
    -inf. Sums of parts over a window (prefix-sum differences, running sums) give ``window_mean``
    its arguments; finite sums stay finite whatever else the trace holds."""
    finite = torch.where(torch.isfinite(values), values, torch.zeros_like(values)).double()
    counts = torch.stack([torch.isnan(values), values == math.inf, values == -math.inf], dim=-1).long()
    return finite, counts


def window_mean(finite_sum, counts, window):
    """The mean of a window of ``window`` values from the sums of its ``window_parts``: NaN if it
    holds a NaN or both infinities, +inf or -inf if it holds infinities of one sign, else the finite
    sum over ``window`` (float64)."""
    mean = finite_sum / window
    nan, positive, negative = counts[..., 0] > 0, counts[..., 1] > 0, counts[..., 2] > 0
    mean = torch.where(positive, math.inf, mean)
    mean = torch.where(negative, -math.inf, mean)
    return torch.where(nan | (positive & negative), math.nan, mean)


def _full_window_means(values, window):
    """``window_mean`` of every full window of ``values`` (1-D float64 NumPy): ``len - window + 1``."""
    finite, counts = window_parts(torch.from_numpy(values))
    finite_sums = torch.cat([finite.new_zeros(1), finite.cumsum(0)])
    count_sums = torch.cat([counts.new_zeros(1, 3), counts.cumsum(0)])
    return window_mean(finite_sums[window:] - finite_sums[:-window], count_sums[window:] - count_sums[:-window],
                       window).numpy()


def group_confidences(confidences, window=DEEPCONF_WINDOW):
    """Sliding-window means of token confidences: ``len - window + 1`` groups, or one group (the mean
    of every token) for a trace shorter than ``window``; empty for an empty trace. A float64 array.

    As the official ``compute_least_grouped`` (deepconf/utils.py), without its 3-decimal rounding.

    Example::

        >>> group_confidences([1.0, 2.0, 3.0, 6.0], window=2).tolist()
        [1.5, 2.5, 4.5]
    """
    values = _history("confidences", confidences)
    window = _positive_int("window", window)
    if values.size == 0:
        return values
    return _full_window_means(values, min(window, values.size))


def stop_position(confidences, window, threshold):
    """Where DeepConf's online early stop ends a trace: the first token index g >= ``window`` - 1
    whose group confidence (the mean of tokens g - window + 1 .. g) is below ``threshold``, or None.
    A window whose mean is NaN never stops (a NaN inside it, or both infinities); one holding -inf
    does. The rule of ``fusedecode.hf.ConfidenceStopping`` and of the vLLM processor's stop (where
    the engine has not masked the stop token).

    Example::

        >>> stop_position([5.0, 1.0, 1.0, 4.0], window=2, threshold=2.0)
        2
        >>> stop_position([5.0, float("nan"), 1.0, 1.0], window=2, threshold=2.0)
        3
    """
    values = _history("confidences", confidences)
    window = _positive_int("window", window)
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise ValueError(f"threshold must be a float, got {threshold!r}")
    if values.size < window:
        return None
    below = np.flatnonzero(_full_window_means(values, window) < threshold)
    return int(below[0]) + window - 1 if below.size else None


def mean_confidence(confidences):
    """Mean token confidence of a trace (NaN if empty). Official: ``calculate_mean_confidence``."""
    values = _history("confidences", confidences)
    return float(values.mean()) if values.size else math.nan


def tail_confidence(confidences, tail=DEEPCONF_WINDOW):
    """Mean confidence of the last ``tail`` tokens (all of them if fewer). Official:
    ``calculate_tail_confidence``."""
    values = _history("confidences", confidences)
    tail = _positive_int("tail", tail)
    return float(values[-tail:].mean()) if values.size else math.nan


def lowest_group_confidence(confidences, window=DEEPCONF_WINDOW):
    """The lowest group confidence of a trace: DeepConf's trace score for the online threshold and
    vote (official: ``min_conf`` of ``process_output``, ``calculate_bottom_window_confidence`` with
    ``bottom_percent=-1``)."""
    groups = group_confidences(confidences, window)
    return float(groups.min()) if groups.size else math.nan


def bottom_group_confidence(confidences, window=DEEPCONF_WINDOW, bottom=0.1):
    """Mean of the lowest ``max(1, int(groups * bottom))`` group confidences (the paper's bottom-10%
    group confidence). Official: ``calculate_bottom_window_confidence``."""
    groups = group_confidences(confidences, window)
    bottom = _fraction("bottom", bottom)
    if not groups.size:
        return math.nan
    count = max(1, int(groups.size * bottom))
    return float(np.partition(groups, count - 1)[:count].mean())


def confidence_threshold(lowest_group_confidences, keep_percent=10):
    """DeepConf's online stop threshold from warm-up traces: the ``(100 - keep_percent)``-th
    percentile (linear interpolation) of their lowest group confidences, so that about
    ``keep_percent`` % of traces would run to the end. The paper uses 16 warm-up traces;
    ``keep_percent=10`` is DeepConf-low (the 90th percentile), ``keep_percent=90`` DeepConf-high (the
    10th).

    Official: ``np.percentile(min_confs, 100 - confidence_percentile)`` in deepconf/wrapper.py, where
    ``confidence_percentile`` is the percentage kept (the original deepconf-online.py wrote
    DeepConf-low as ``np.percentile(min_confs, 90)``). NaN among the inputs gives NaN.

    Example::

        >>> confidence_threshold([1.0, 2.0, 3.0, 4.0, 5.0], keep_percent=25)
        4.0
    """
    values = _history("lowest_group_confidences", lowest_group_confidences)
    if isinstance(keep_percent, bool) or not isinstance(keep_percent, Real) or not 0 < keep_percent <= 100:
        raise ValueError(f"keep_percent must be a number in (0, 100], got {keep_percent!r}")
    if values.size == 0:
        raise ValueError("lowest_group_confidences is empty: calibration needs at least one warm-up trace")
    return float(np.percentile(values, 100 - keep_percent))


def filter_top(confidences, top=0.1):
    """Which traces are in the top ``top`` fraction by a trace confidence: ``confidence >=`` its
    ``100 * (1 - top)``-th percentile (ties at the cut all kept). A list of bools. Official:
    ``filter_top_confidence`` (the paper's top-eta filtering, eta = 10% or 90%). NaN confidences are
    never kept."""
    values = _history("confidences", confidences)
    top = _fraction("top", top)
    if values.size == 0:
        return []
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return [False] * values.size
    threshold = np.percentile(finite, 100 * (1 - top))
    return [bool(value >= threshold) for value in values]


def _check_candidates(answers, scores_name, scores):
    """The candidates of a vote: as many scores as answers, and at least one (an empty vote is a
    caller's bug, not a tie: it raises rather than returning no winner)."""
    if len(answers) != len(scores):
        raise ValueError(f"{scores_name} ({len(scores)}) and answers ({len(answers)}) differ in length")
    if not answers:
        raise ValueError(f"answers and {scores_name} are empty: a vote needs at least one candidate")


def _answers_and_weights(answers, weights):
    answers = list(answers)
    weights = [float(w) for w in _history("weights", weights)]
    _check_candidates(answers, "weights", weights)
    return answers, weights


def weighted_majority_vote(answers, weights):
    """The answer with the largest total weight: ``(answer, totals)``, ``totals`` per answer in the
    order first seen. Candidates whose answer is None or whose weight is NaN do not vote; equal
    totals go to the answer seen first (as the official ``weighted_majority_vote``, a ``max`` over a
    dict in insertion order). ``(None, {})`` when nobody votes; no candidates at all (empty lists)
    is a ValueError.

    Example::

        >>> weighted_majority_vote(["7", "9", "9"], [3.0, 1.0, 1.5])
        ('7', {'7': 3.0, '9': 2.5})
    """
    answers, weights = _answers_and_weights(answers, weights)
    totals = {}
    for answer, weight in zip(answers, weights):
        if answer is not None and not math.isnan(weight):
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None, totals
    return max(totals, key=totals.__getitem__), totals


def majority_vote(answers):
    """The most frequent answer (None answers ignored; ties to the answer seen first, as
    ``Counter.most_common``): ``(answer, counts)``."""
    answers = list(answers)
    return weighted_majority_vote(answers, [1.0] * len(answers))


def deepconf_vote(answers, lowest_group_confidences, threshold):
    """DeepConf's online vote: every trace (warm-up or final) whose lowest group confidence is at
    least ``threshold`` votes with that confidence as its weight; stopped traces fall below the
    threshold by construction. ``(answer, totals)`` as ``weighted_majority_vote``. Official:
    ``_perform_basic_voting`` in deepconf/wrapper.py (a final trace is marked stopped when its
    ``min_conf < conf_bar``)."""
    answers, weights = _answers_and_weights(answers, lowest_group_confidences)
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a float, got {threshold!r}")
    kept = [answer if weight >= threshold else None for answer, weight in zip(answers, weights)]
    return weighted_majority_vote(kept, weights)


def best_of_n(self_certainties, answers, power=0.5):
    r"""Borda voting with self-certainty (Kang et al., 2025).

    The N candidates are ranked by self-certainty (rank 1 = most certain); each votes for its answer
    with weight ``(N - r + 1) ** power`` (``power=0``: majority vote). The answer with the largest
    total wins. Ties break as in the official code (backprop07/Self-Certainty,
    ``src/voting_from_list.py``): equal self-certainties rank by candidate order (the lower index
    ranks first, a stable sort), and equal totals go to the answer seen first in candidate order.
    Candidates whose answer is None (none could be extracted) are ignored but still hold their rank;
    a NaN self-certainty ranks last.

    Returns ``(answer, totals)`` with ``totals`` the vote of every answer, in the order first seen;
    ``(None, {})`` when no candidate has an answer. No candidates at all (empty lists) is a ValueError.

    Example::

        >>> best_of_n([2.0, 1.0, 0.5], ["12", "13", "13"])[0]
        '13'
        >>> best_of_n([2.0, 1.0, 0.5], ["12", "13", "13"], power=2.0)[0]
        '12'
        >>> best_of_n([1.0, 1.0], ["p", "q"], power=1.0)  # equal certainties: candidate 0 ranks first
        ('p', {'p': 2.0, 'q': 1.0})
    """
    values = [float(v) for v in _history("self_certainties", self_certainties)]
    answers = list(answers)
    _check_candidates(answers, "self_certainties", values)
    if isinstance(power, bool) or not isinstance(power, Real) or not power >= 0 or math.isinf(power):
        raise ValueError(f"power must be a finite float >= 0, got {power!r}")
    count = len(values)
    # A stable sort on the negated value: equal certainties keep candidate order.
    order = sorted(range(count), key=lambda i: -values[i] if not math.isnan(values[i]) else math.inf)
    weight = {index: (count - rank) ** power for rank, index in enumerate(order)}
    totals = {}
    for index, answer in enumerate(answers):  # candidate order: the order answers are first seen
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight[index]
    if not totals:
        return None, totals
    return max(totals, key=totals.__getitem__), totals
