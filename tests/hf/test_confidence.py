"""fusedecode.confidence (DeepConf measures, calibration and votes; self-certainty Borda voting)
against small transcriptions of the authors' code, on random inputs with ties.

The transcriptions restate the official logic as plain loops (they are not the authors' code):
facebookresearch/deepconf ``deepconf/utils.py`` (``compute_least_grouped``,
``calculate_mean_confidence``, ``calculate_tail_confidence``, ``calculate_bottom_window_confidence``,
``filter_top_confidence``, ``weighted_majority_vote``, ``simple_majority_vote``) and
``deepconf/wrapper.py`` (``_deepthink_online``: the threshold; ``_perform_basic_voting``: the online
vote), and backprop07/Self-Certainty ``src/voting_from_list.py`` (``confidence_with_file``: Borda).
The official DeepConf code rounds stored confidences to 3 decimals; the transcriptions leave that
out, as the library does.
"""

import doctest
import math
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import fusedecode.confidence as confidence
from fusedecode.confidence import (best_of_n, bottom_group_confidence, confidence_threshold, deepconf_vote,
                                   filter_top, group_confidences, lowest_group_confidence, majority_vote,
                                   mean_confidence, tail_confidence, weighted_majority_vote)

# ------------------------------------------------------------------------------------------------
# Transcriptions of the official logic


def official_groups(confs, group_size):
    """deepconf/utils.py compute_least_grouped: one mean per full window; a short trace is one group."""
    if len(confs) < group_size:
        return [sum(confs) / len(confs)] if confs else [0]
    return [sum(confs[i:i + group_size]) / group_size for i in range(len(confs) - group_size + 1)]


def official_mean(confs):
    """deepconf/utils.py calculate_mean_confidence."""
    return float(np.mean(confs)) if confs else 0.0


def official_tail(confs, tail_tokens):
    """deepconf/utils.py calculate_tail_confidence."""
    if not confs:
        return 0.0
    return float(np.mean(confs[-tail_tokens:] if len(confs) > tail_tokens else confs))


def official_bottom_window(confs, window_size, bottom_percent):
    """deepconf/utils.py calculate_bottom_window_confidence (bottom_percent=-1: the lowest window)."""
    if not confs:
        return 0.0
    if len(confs) < window_size:
        return float(np.mean(confs))
    running = sum(confs[:window_size])
    means = [running / window_size]
    for i in range(1, len(confs) - window_size + 1):
        running += confs[i + window_size - 1] - confs[i - 1]
        means.append(running / window_size)
    if bottom_percent == -1:
        return min(means)
    count = max(1, int(len(means) * bottom_percent))
    return min(means) if count == 1 else float(np.mean(np.partition(means, count - 1)[:count]))


def official_filter_top(confidences, top_percent):
    """deepconf/utils.py filter_top_confidence: indices of the kept traces."""
    threshold = np.percentile(confidences, (1 - top_percent) * 100)
    return [i for i, conf in enumerate(confidences) if conf >= threshold]


def official_weighted_vote(answers, weights):
    """deepconf/utils.py weighted_majority_vote: totals in first-seen order, max keeps the first."""
    totals = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[str(answer)] = totals.get(str(answer), 0.0) + float(weight)
    return max(totals, key=lambda a: totals[a]) if totals else None


def official_majority(answers):
    """deepconf/utils.py simple_majority_vote."""
    return Counter(answers).most_common(1)[0][0] if answers else None


def official_threshold(warmup_min_confs, confidence_percentile):
    """deepconf/wrapper.py _deepthink_online: conf_bar, confidence_percentile = percent of traces kept."""
    return float(np.percentile(warmup_min_confs, 100 - confidence_percentile))


def official_online_vote(warmup, final, conf_bar):
    """deepconf/wrapper.py _perform_basic_voting (online): warm-up traces at or above the bar, final
    traces not marked stopped (min_conf < bar marks them), each weighted by its min_conf."""
    answers, weights = [], []
    for answer, min_conf in warmup:
        if min_conf >= conf_bar and answer:
            answers.append(answer)
            weights.append(min_conf)
    for answer, min_conf in final:
        if min_conf < conf_bar:  # stop_reason = "gconf_threshold"
            continue
        if answer:
            answers.append(answer)
            weights.append(min_conf)
    return official_weighted_vote(answers, weights)


def official_borda(confidences, answers, power):
    """Self-Certainty src/voting_from_list.py confidence_with_file: the Borda count, as a loop. The
    rank order is a stable sort by confidence, descending; each vote goes to the first candidate with
    the same answer; the winner is the first candidate holding the largest total."""
    n = len(confidences)
    order = sorted(range(n), key=lambda k: confidences[k], reverse=True)
    vote_of = {order[rank]: (n - rank) ** power for rank in range(n)}
    votes = [0.0] * n
    for i in range(n):
        if answers[i] is None:
            continue
        first = next((j for j in range(i) if answers[j] is not None and answers[j] == answers[i]), i)
        votes[first] += vote_of[i]
    best = votes.index(max(votes))
    totals = {answers[j]: votes[j] for j in range(n)
              if answers[j] is not None and all(answers[k] != answers[j] for k in range(j))}
    return answers[best], totals


# ------------------------------------------------------------------------------------------------
# Trace measures


def random_trace(rng, length):
    return [rng.uniform(0.5, 12.0) for _ in range(length)]


@pytest.mark.parametrize("window", [1, 4, 16])
def test_trace_measures_match_official(window):
    rng = random.Random(window)
    for length in [1, 2, window - 1, window, window + 1, 3 * window + 5, 200]:
        if length < 1:
            continue
        trace = random_trace(rng, length)
        as_tensor = torch.tensor(trace, dtype=torch.float64)
        np.testing.assert_allclose(group_confidences(trace, window), official_groups(trace, window), rtol=1e-12)
        np.testing.assert_allclose(group_confidences(as_tensor, window), official_groups(trace, window), rtol=1e-12)
        assert lowest_group_confidence(trace, window) == pytest.approx(min(official_groups(trace, window)),
                                                                       rel=1e-12)
        assert lowest_group_confidence(trace, window) == pytest.approx(official_bottom_window(trace, window, -1),
                                                                       rel=1e-12)
        for bottom in (0.1, 0.5, 1.0):
            assert bottom_group_confidence(trace, window, bottom) == pytest.approx(
                official_bottom_window(trace, window, bottom), rel=1e-12)
        assert mean_confidence(trace) == pytest.approx(official_mean(trace), rel=1e-12)
        for tail in (1, window, 50, 10_000):
            assert tail_confidence(trace, tail) == pytest.approx(official_tail(trace, tail), rel=1e-12)


def test_empty_and_nan_traces():
    for measure in (mean_confidence, tail_confidence, lowest_group_confidence, bottom_group_confidence):
        assert math.isnan(measure([]))  # no tokens, no confidence (the official code says 0.0)
        assert math.isnan(measure([1.0, math.nan, 2.0]))
    assert group_confidences([], 4).size == 0
    assert math.isnan(confidence_threshold([1.0, math.nan, 3.0]))
    with pytest.raises(ValueError, match="window"):
        group_confidences([1.0], 0)
    with pytest.raises(ValueError, match="confidences"):
        mean_confidence([[1.0, 2.0]])
    with pytest.raises(ValueError, match="bottom"):
        bottom_group_confidence([1.0], 4, bottom=0.0)
    with pytest.raises(ValueError, match="keep_percent"):
        confidence_threshold([1.0], keep_percent=150)
    with pytest.raises(ValueError, match="empty"):
        confidence_threshold([])


# ------------------------------------------------------------------------------------------------
# Calibration, filtering and votes


@pytest.mark.parametrize("traces", [16, 5, 64])
def test_confidence_threshold_matches_official(traces):
    """DeepConf-low keeps the top 10% (the 90th percentile of the warm-up traces' lowest group
    confidences), DeepConf-high the top 90% (the 10th): both official conventions agree."""
    rng = random.Random(traces)
    for _ in range(50):
        lowest = [lowest_group_confidence(random_trace(rng, rng.randint(1, 60)), 8) for _ in range(traces)]
        for kept_percent in (10, 90, 50, 100):
            assert confidence_threshold(lowest, keep_percent=kept_percent) == official_threshold(lowest,
                                                                                                 kept_percent)
        # The original deepconf-online.py: CONFIDENCE_PERCENTILE = 90 is np.percentile(min_confs, 90).
        assert confidence_threshold(lowest, keep_percent=10) == float(np.percentile(lowest, 90))


def test_filter_top_matches_official():
    rng = random.Random(3)
    for _ in range(200):
        count = rng.randint(1, 40)
        values = [float(rng.randint(0, 6)) for _ in range(count)]  # many ties at the cut
        for top in (0.1, 0.5, 0.9, 1.0):
            kept = [i for i, keep in enumerate(filter_top(values, top)) if keep]
            assert kept == official_filter_top(values, top), (values, top)


def random_answers(rng, count, pool="abcd", none_rate=0.15):
    return [None if rng.random() < none_rate else rng.choice(pool) for _ in range(count)]


def test_votes_match_official():
    rng = random.Random(4)
    for _ in range(500):
        count = rng.randint(1, 12)
        answers = random_answers(rng, count)
        weights = [float(rng.randint(1, 4)) for _ in range(count)]  # integer weights: exact ties
        winner, totals = weighted_majority_vote(answers, weights)
        assert winner == official_weighted_vote(answers, weights)
        assert totals == {a: sum(w for b, w in zip(answers, weights) if b == a) for a in totals}
        voters = [a for a in answers if a is not None]
        if voters:  # no candidates at all is refused (test_empty_votes_are_refused)
            assert majority_vote(voters)[0] == official_majority(voters)
    assert weighted_majority_vote([None, None], [1.0, 2.0]) == (None, {})
    assert weighted_majority_vote(["x", "y"], [math.nan, 1.0])[0] == "y"  # a NaN weight does not vote


def test_deepconf_online_vote_matches_official():
    rng = random.Random(5)
    for _ in range(300):
        warmup = [(rng.choice("abc"), rng.uniform(1, 10)) for _ in range(rng.randint(1, 16))]
        final = [(rng.choice("abc"), rng.uniform(1, 10)) for _ in range(rng.randint(0, 30))]
        bar = confidence_threshold([c for _, c in warmup], keep_percent=rng.choice([10, 90]))
        traces = warmup + final
        ours = deepconf_vote([a for a, _ in traces], [c for _, c in traces], bar)[0]
        assert ours == official_online_vote(warmup, final, bar)


def test_best_of_n_matches_official_with_ties():
    """Equal self-certainties rank by candidate order (lower index first); equal totals go to the
    answer seen first."""
    rng = random.Random(6)
    for _ in range(2000):
        count = rng.randint(1, 10)
        certainties = [float(rng.randint(0, 3)) for _ in range(count)]  # frequent equal certainties
        answers = random_answers(rng, count, pool="abc")
        power = rng.choice([0.0, 0.5, 1.0, 2.0])
        if all(a is None for a in answers):
            assert best_of_n(certainties, answers, power) == (None, {})
            continue
        expected = official_borda(certainties, answers, power)
        assert best_of_n(certainties, answers, power) == expected, (certainties, answers, power)
        assert best_of_n(torch.tensor(certainties), answers, power) == expected


def test_best_of_n_examples_and_errors():
    # Ranks 1..4 get weights 4, 3, 2, 1: a = 4, b = 3 + 2 = 5, c = 1.
    assert best_of_n([3.0, 2.0, 1.0, 0.5], ["a", "b", "b", "c"], power=1.0) == ("b", {"a": 4.0, "b": 5.0, "c": 1.0})
    assert best_of_n([1.0, 2.0], ["p", "q"], power=0)[0] == "p"  # equal totals: the answer seen first
    assert best_of_n([2.0, 2.0], ["p", "q"], power=1.0)[0] == "p"  # equal certainties: index 0 ranks first
    assert best_of_n([1.0, math.nan], ["p", "q"], power=1.0)[0] == "p"  # NaN ranks last
    with pytest.raises(ValueError, match="length"):
        best_of_n([1.0], ["a", "b"])
    with pytest.raises(ValueError, match="power"):
        best_of_n([1.0], ["a"], power=-1)


@pytest.mark.parametrize("vote", [
    lambda: best_of_n([], []),
    lambda: best_of_n(torch.zeros(0), []),
    lambda: best_of_n(np.zeros(0), [], power=0.0),
    lambda: weighted_majority_vote([], []),
    lambda: majority_vote([]),
    lambda: deepconf_vote([], [], 1.0),
], ids=["best_of_n", "best_of_n-tensor", "best_of_n-numpy", "weighted", "majority", "deepconf"])
def test_empty_votes_are_refused(vote):
    """No candidates is a caller's bug, not "nobody voted" ((None, {}), kept for all-None answers)."""
    with pytest.raises(ValueError, match="empty.*at least one candidate"):
        vote()


def test_docstring_examples():
    failures, tried = doctest.testmod(confidence, verbose=False)
    assert tried > 0 and failures == 0


def test_importable_without_transformers():
    code = ("import sys; import fusedecode.confidence; "
            "assert 'transformers' not in sys.modules, 'fusedecode.confidence imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)
