"""fusedecode.steps, fusedecode.triggers and fusedecode.reflection without transformers: the step cut
and per-step measures (offline against plain-Python references, online accumulators and cutter
against offline, bit for bit), the SRGen and step triggers' settings, and the reflection insertion
rule (the device functions against an independent transcription of the documented rule)."""

import doctest
import importlib
import math
import random
import subprocess
import sys

import pytest
import torch

from fusedecode import reflection, steps
from fusedecode.reflection import (Insertion, ReflectionConfig, ReflectionRules, insertion_points, insertions_of,
                                   new_state, observe_distribution, observe_token, put_rows, take_rows)
from fusedecode.steps import (DelimiterTable, accumulate, cut_step, cut_steps, new_accumulator, new_cutter,
                              restart_steps, spans_from_step_indices, statistics_of_spans, step_measure,
                              step_statistics)
from fusedecode.triggers import SRGenTrigger, StepTrigger


@pytest.mark.parametrize("name", ["fusedecode.steps", "fusedecode.triggers", "fusedecode.reflection",
                                  "fusedecode.vllm._options"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), verbose=False)
    assert failures == 0 and tried > 0


def test_modules_import_without_transformers():
    code = ("import sys, fusedecode.steps, fusedecode.triggers, fusedecode.reflection, fusedecode.confidence; "
            "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# Cutting


def spans(tokens, delimiters):
    result = cut_steps(tokens, delimiters)
    return [(s, e, t) for s, e, t in zip(result.start.tolist(), result.end.tolist(), result.terminated.tolist())]


def test_cut_steps_rules():
    # The delimiter belongs to the step it ends; the rest is one unterminated step.
    assert spans([4, 9, 9, 9, 5], [[9, 9]]) == [(0, 3, True), (3, 5, False)]
    # As str.split: "a\n\n\nb" with "\n\n" -> "a\n\n" and "\nb" (occurrences never straddle a boundary).
    assert spans([1, 7, 7, 7, 2], [[7, 7]]) == [(0, 3, True), (3, 5, False)]
    assert spans([7, 7, 7, 7], [[7, 7]]) == [(0, 2, True), (2, 4, True)]
    # A delimiter that starts with a shorter one never matches: the shorter ends first.
    assert spans([3, 7, 7, 3], [[7], [7, 7]]) == [(0, 2, True), (2, 3, True), (3, 4, False)]
    # A delimiter at the very start, at the very end, and an empty trace.
    assert spans([5, 1, 5], [5]) == [(0, 1, True), (1, 3, True)]
    assert spans([], [5]) == []
    assert spans([1, 2, 3], [5]) == [(0, 3, False)]
    # A multi-token delimiter whose first token ended the step before does not match across it.
    assert spans([8, 9, 8, 9, 9], [[9], [9, 8]]) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert spans([1, 8, 9, 2], [[8, 9], [9, 2]]) == [(0, 3, True), (3, 4, False)]


def test_delimiter_arguments():
    assert steps.check_delimiters([5, [7, 8], (9,)]) == ((5,), (7, 8), (9,))
    assert steps.check_delimiters(torch.tensor([[1, 2], [3, 4]])) == ((1, 2), (3, 4))
    for bad, message in (([], "delimiters is empty"), ([[]], r"delimiters\[0\] is empty"),
                         ([-1], r"delimiters\[0\] must be >= 0"), ([[1, -2]], r"delimiters\[0\] must be >= 0")):
        with pytest.raises(ValueError, match=message):
            steps.check_delimiters(bad)
    for bad in ("ab", 5, [1.5], [[True]], None):
        with pytest.raises(TypeError, match="delimiters"):
            steps.check_delimiters(bad)
    with pytest.raises(ValueError, match="values .* and tokens .* differ"):
        step_statistics([1.0, 2.0], [1, 2, 3], [2])
    with pytest.raises(ValueError, match="tail must be >= 1"):
        step_statistics([1.0], [1], [2], tail=0)
    with pytest.raises(ValueError, match="tokens must be a 1-D"):
        cut_steps([[1, 2]], [2])


def random_delimiters(rng, alphabet):
    """A few delimiters over a small alphabet, some sharing prefixes or suffixes with others."""
    delimiters = [tuple(rng.randrange(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.5:
        delimiters.append(delimiters[0] + (rng.randrange(alphabet),))
    if rng.random() < 0.5:
        delimiters.append((rng.randrange(alphabet),) + delimiters[-1])
    return delimiters


def test_online_cutter_equals_offline_on_random_streams():
    """Rows fed one token at a time (some rows pausing: ``rows``), multi-token delimiters spanning
    calls: each token's step index and each step end equal cut_steps of the row's tokens."""
    rng = random.Random(3)
    checked_ends = 0
    for trial in range(60):
        alphabet = rng.choice([2, 3, 5])
        delimiters = random_delimiters(rng, alphabet)
        table = DelimiterTable.build(delimiters)
        batch, length = 5, rng.randint(0, 40)
        streams = torch.randint(0, alphabet, (batch, length), generator=torch.Generator().manual_seed(trial))
        present = torch.rand(batch, length, generator=torch.Generator().manual_seed(100 + trial)) < 0.8
        state = new_cutter(batch, table, "cpu")
        fed = [[] for _ in range(batch)]
        indices = [[] for _ in range(batch)]
        ends = [[] for _ in range(batch)]
        for t in range(length):
            for row in range(batch):
                if present[row, t]:
                    indices[row].append(int(state.index[row]))
            state, ended = cut_step(table, state, streams[:, t], present[:, t])
            for row in range(batch):
                if present[row, t]:
                    fed[row].append(int(streams[row, t]))
                    ends[row].append(bool(ended[row]))
                else:
                    assert not ended[row]
        for row in range(batch):
            expected = spans(fed[row], delimiters)
            ids = torch.tensor(indices[row], dtype=torch.int64)
            got = spans_from_step_indices(ids, bool(ends[row][-1]) if ends[row] else False)
            assert [(s, e, t) for s, e, t in zip(got.start.tolist(), got.end.tolist(), got.terminated.tolist())] \
                == expected, (trial, row, fed[row], delimiters)
            assert [e for s, e, t in expected if t] == [i + 1 for i, end in enumerate(ends[row]) if end]
            checked_ends += sum(ends[row])
    assert checked_ends > 300


# ------------------------------------------------------------------------------------------------
# Measures


def reference_measures(values, tail):
    """The definitions, written directly (NaN-aware min; mean by math.fsum, compared approximately)."""
    nan = any(math.isnan(v) for v in values)
    last = values[-tail:]
    return dict(count=len(values), mean=math.fsum(values) / len(values) if not nan else math.nan,
                min=math.nan if nan else min(values),
                tail=math.nan if any(math.isnan(v) for v in last) else math.fsum(last) / len(last))


def random_values(generator, count):
    """float32 values of very different magnitudes, with zeros, negative zeros, NaN and infinities."""
    magnitude = torch.pow(10.0, torch.randint(-30, 4, (count,), generator=generator).float())
    values = torch.randn(count, generator=generator) * magnitude
    special = torch.rand(count, generator=generator)
    values = torch.where(special < 0.02, torch.nan, values)
    values = torch.where((special > 0.02) & (special < 0.03), -0.0, values)
    values = torch.where((special > 0.03) & (special < 0.035), math.inf, values)
    return values.float()


def test_step_statistics_definitions():
    stats = step_statistics([1.0, 3.0, math.nan, 5.0, 2.0, 4.0, 6.0], [0, 9, 0, 9, 0, 0, 0], [9], tail=2)
    assert stats.count.tolist() == [2, 2, 3]
    assert stats.terminated.tolist() == [True, True, False]
    assert stats.start.tolist() == [0, 2, 4]
    assert stats.mean[0] == 2.0 and math.isnan(stats.mean[1]) and stats.mean[2] == 4.0
    assert stats.min[0] == 1.0 and math.isnan(stats.min[1]) and stats.min[2] == 2.0
    # tail: the last 2 tokens of each step; NaN only where the NaN is among them.
    assert stats.tail[0] == 2.0 and math.isnan(stats.tail[1]) and stats.tail[2] == 5.0
    nan_outside_tail = step_statistics([math.nan, 1.0, 3.0], [0, 0, 0], [9], tail=2)
    assert nan_outside_tail.tail.tolist() == [2.0] and math.isnan(nan_outside_tail.mean[0])
    assert stats.mean.dtype == stats.min.dtype == stats.tail.dtype == torch.float64
    empty = step_statistics([], [], [9])
    assert empty.count.numel() == 0 and empty.mean.numel() == 0


@pytest.mark.parametrize("tail", [1, 3, 8])
def test_step_statistics_against_reference(tail):
    generator = torch.Generator().manual_seed(tail)
    rng = random.Random(tail)
    for _ in range(40):
        length = rng.randint(1, 60)
        tokens = torch.randint(0, 4, (length,), generator=generator)
        values = random_values(generator, length)
        stats = step_statistics(values, tokens, [[3], [1, 2]], tail=tail)
        for step, (start, end, _) in enumerate(spans(tokens.tolist(), [[3], [1, 2]])):
            expected = reference_measures(values[start:end].double().tolist(), tail)
            assert stats.count[step] == expected["count"]
            for measure in ("mean", "min", "tail"):
                got, want = float(getattr(stats, measure)[step]), expected[measure]
                if math.isnan(want) or math.isinf(want):
                    assert got == want or (math.isnan(got) and math.isnan(want)), (measure, got, want)
                else:
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (measure, got, want)


def test_online_accumulator_equals_offline_bit_for_bit():
    """Three fields, rows pausing, steps ending where the offline cut ends them: every measure of every
    step at its end equals step_statistics exactly (same float64 summation order), NaN where NaN."""
    generator = torch.Generator().manual_seed(7)
    delimiters = [[2], [0, 1]]
    table = DelimiterTable.build(delimiters)
    batch, length, fields, kept = 6, 80, 3, 5
    tokens = torch.randint(0, 4, (batch, length), generator=generator)
    values = torch.stack([random_values(generator, batch * length).reshape(batch, length) for _ in range(fields)], 2)
    present = torch.rand(batch, length, generator=generator) < 0.85
    cutter, accumulator = new_cutter(batch, table, "cpu"), new_accumulator(batch, fields, kept, "cpu")
    online = [[] for _ in range(batch)]  # per row: per ended step, {(measure, field, tail): value}
    compared = 0
    for t in range(length):
        accumulator = accumulate(accumulator, values[:, t], present[:, t])
        cutter, ended = cut_step(table, cutter, tokens[:, t], present[:, t])
        measured = {(measure, field, tail): step_measure(accumulator, measure, field, tail)
                    for measure in ("count", "mean", "min") for field in range(fields) for tail in (kept,)}
        measured.update({("tail", field, tail): step_measure(accumulator, "tail", field, tail)
                         for field in range(fields) for tail in (1, 2, kept)})
        for row in ended.nonzero().flatten().tolist():
            online[row].append({key: float(value[row]) for key, value in measured.items()})
        accumulator = restart_steps(accumulator, ended)
    for row in range(batch):
        row_tokens = tokens[row][present[row]]
        for field in range(fields):
            row_values = values[row, :, field][present[row]]
            for tail in (1, 2, kept):
                offline = step_statistics(row_values, row_tokens, delimiters, tail=tail)
                ended_steps = int(offline.terminated.sum())
                assert len(online[row]) == ended_steps
                for step in range(ended_steps):
                    for measure in ("count", "mean", "min", "tail"):
                        got = online[row][step][(measure, field, tail if measure == "tail" else kept)]
                        want = float(getattr(offline, measure)[step])
                        assert got == want or (math.isnan(got) and math.isnan(want)), (row, step, measure, got, want)
                        compared += 1
    assert compared > 1000


def test_step_measure_arguments():
    state = new_accumulator(2, 1, 3, "cpu")
    with pytest.raises(ValueError, match="measure must be one of"):
        step_measure(state, "max", 0)
    with pytest.raises(ValueError, match=r"tail must be in \[1, 3\]"):
        step_measure(state, "tail", 0, tail=4)


def test_spans_from_step_indices_and_statistics_of_spans():
    got = spans_from_step_indices(torch.tensor([0, 0, 1, 2, 2]), last_terminated=True)
    assert got.start.tolist() == [0, 2, 3] and got.end.tolist() == [2, 3, 5] and got.terminated.tolist() == [True] * 3
    with pytest.raises(ValueError, match="values has 2 entries but the steps cover 5"):
        statistics_of_spans([1.0, 2.0], got)


# ------------------------------------------------------------------------------------------------
# Triggers and the insertion config


def test_trigger_settings():
    assert SRGenTrigger() == SRGenTrigger(25, 4.0, 0.5, 1.8, 3.0)
    for kwargs, name in ((dict(window=1), "window"), (dict(k=math.nan), "k"), (dict(min_std=-0.1), "min_std"),
                         (dict(min_threshold=math.nan), "min_threshold"), (dict(warmup_threshold=math.nan),
                                                                            "warmup_threshold")):
        with pytest.raises(ValueError, match=name):
            SRGenTrigger(**kwargs)
    with pytest.raises(TypeError, match="window"):
        SRGenTrigger(window=2.5)
    for kwargs, name in ((dict(threshold=math.nan), "threshold"), (dict(threshold=math.inf), "threshold"),
                         (dict(threshold=1.0, field="entropi"), "field"),
                         (dict(threshold=1.0, measure="max"), "measure"),
                         (dict(threshold=1.0, fires_when="over"), "fires_when"), (dict(threshold=1.0, tail=0), "tail")):
        with pytest.raises(ValueError, match=name):
            StepTrigger(**kwargs)
    with pytest.raises(TypeError, match="threshold"):
        StepTrigger(threshold="1")
    below = StepTrigger(threshold=1.0, fires_when="below")
    values = torch.tensor([0.5, 1.0, 1.5, math.nan], dtype=torch.float64)
    assert below.fires(values).tolist() == [True, False, False, False]
    assert StepTrigger(threshold=1.0).fires(values).tolist() == [False, False, True, False]


def test_reflection_config_arguments():
    step = StepTrigger(threshold=1.0, field="self_certainty", measure="tail", tail=3)
    config = ReflectionConfig(tokens=torch.tensor([4, 5]), triggers=[SRGenTrigger(), step], delimiters=[1])
    assert config.tokens == (4, 5) and config.fields == ("entropy", "self_certainty")
    assert config.srgen == SRGenTrigger() and config.step_triggers == (step,)
    with pytest.raises(AttributeError):  # frozen: a processor's rules cannot change under it
        config.max_insertions = 3
    for kwargs, error, name in (
            (dict(tokens=[], triggers=step, delimiters=[1]), ValueError, "tokens is empty"),
            (dict(tokens=[-1], triggers=step, delimiters=[1]), ValueError, "tokens must be >= 0"),
            (dict(tokens="ab", triggers=step, delimiters=[1]), TypeError, "tokens"),
            (dict(tokens=[1], triggers=[], delimiters=[1]), ValueError, "triggers"),
            (dict(tokens=[1], triggers=[step, "x"], delimiters=[1]), TypeError, "triggers"),
            (dict(tokens=[1], triggers=[SRGenTrigger(), SRGenTrigger()]), ValueError, "more than one SRGenTrigger"),
            (dict(tokens=[1], triggers=step), ValueError, "delimiters must be given"),
            (dict(tokens=[1], triggers=step, delimiters=[]), ValueError, "delimiters is empty"),
            (dict(tokens=[1], triggers=step, delimiters=[1], max_insertions=-1), ValueError, "max_insertions"),
            (dict(tokens=[1], triggers=step, delimiters=[1], max_insertions=1.0), TypeError, "max_insertions")):
        with pytest.raises(error, match=name):
            ReflectionConfig(**kwargs)
    with pytest.raises(TypeError, match="config"):
        ReflectionRules.build("config")


# ------------------------------------------------------------------------------------------------
# The insertion rule: device functions against a transcription of the documented rule


def transcribed_rule(tokens, values, present, config):
    """The module docstring's rule for one row, as a plain loop (independent of the device code).
    ``values[field][t]`` are floats, ``present[t]`` whether the row is generating at step t. Returns
    (insertions as lists, the steps t whose token is forced)."""
    phrase, limit = config.tokens, config.max_insertions
    srgen = config.srgen
    history, insertions = [], []
    forcing = None  # index in phrase of the next forced token
    step_tokens, step_values, step_inserted = [], [], False
    position, forced = 0, []
    for t in range(len(tokens)):
        if not present[t]:
            continue
        # Before the token: SRGen's rule on a free token after the first.
        if srgen is not None and forcing is None and position >= 1:
            entropy = values["entropy"][t]
            threshold = srgen.warmup_threshold
            if len(history) >= srgen.window:
                window = torch.tensor(history[-srgen.window:])
                spread = max(float(torch.std(window)), srgen.min_std)
                threshold = max(float(torch.mean(window)) + srgen.k * spread, srgen.min_threshold)
            history.append(entropy)
            if entropy > threshold and len(insertions) < limit:
                insertions.append([position, config.triggers.index(srgen), entropy, threshold, 0])
                forcing = 0
        step_values.append({field: values[field][t] for field in values})
        step_inserted |= forcing is not None
        if forcing is not None:
            forced.append(t)
        # After the token.
        if forcing is not None:
            insertions[-1][4] += tokens[t] == phrase[forcing]
            forcing = forcing + 1 if forcing + 1 < len(phrase) else None
        step_tokens.append(tokens[t])
        position += 1
        if config.delimiters is not None and any(
                len(d) <= len(step_tokens) and tuple(step_tokens[-len(d):]) == d for d in config.delimiters):
            if not step_inserted and forcing is None and len(insertions) < limit:
                for index, trigger in enumerate(config.triggers):
                    if not isinstance(trigger, StepTrigger):
                        continue
                    series = [v[trigger.field] for v in step_values] if trigger.measure != "count" else []
                    if trigger.measure == "count":
                        value = float(len(step_values))
                    elif trigger.measure == "min":
                        value = math.nan if any(map(math.isnan, series)) else min(series)
                    else:
                        kept = series if trigger.measure == "mean" else series[-trigger.tail:]
                        total = 0.0
                        for v in kept:
                            total += v
                        value = total / len(kept)
                    if (value > trigger.threshold) if trigger.fires_when == "above" else (value < trigger.threshold):
                        insertions.append([position, index, value, trigger.threshold, 0])
                        forcing = 0
                        break
            step_tokens, step_values, step_inserted = [], [], False
    return insertions, forced


def run_rule(config, tokens, values, present, feed_back=None):
    """The device rule over a batch, one step at a time. Rows not present at a step skip it (taken out
    of the state and put back, as an engine does with its request slots); in the ``feed_back`` rows
    the forced token replaces the given one (as in generation). Returns (insertions per row, the
    emitted tokens, which steps were forced)."""
    rules = ReflectionRules.build(config)
    batch, length = tokens.shape
    state = new_state(rules, batch, "cpu")
    emitted, was_forced = tokens.clone(), torch.zeros_like(tokens, dtype=torch.bool)
    feed_back = torch.zeros(batch, dtype=torch.bool) if feed_back is None else feed_back
    for t in range(length):
        rows = present[:, t].nonzero().flatten()
        part = take_rows(state, rows)
        everyone = torch.ones(rows.numel(), dtype=torch.bool)
        part, forced = observe_distribution(rules, part, {f: values[f][rows, t] for f in config.fields}, everyone)
        emitted[rows, t] = torch.where((forced >= 0) & feed_back[rows], forced, tokens[rows, t])
        was_forced[rows, t] = forced >= 0
        part = observe_token(rules, part, emitted[rows, t], everyone)
        state = put_rows(state, rows, part)
    return insertions_of(state), emitted, was_forced


def rule_inputs(seed, batch, length, fields, forced_phrase=None):
    """Tokens over a small alphabet and float32 values per field (entropy-like: spikes over a base)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6, (batch, length), generator=generator)
    values = {}
    for field in fields:
        base = torch.rand(batch, 1, generator=generator)
        spikes = (torch.rand(batch, length, generator=generator) < 0.08) * 3 * torch.rand(batch, length,
                                                                                          generator=generator)
        values[field] = (base + 0.3 * torch.rand(batch, length, generator=generator) + spikes).float()
    present = torch.rand(batch, length, generator=generator) < 0.9
    return tokens, values, present


@pytest.mark.parametrize("triggers, delimiters, max_insertions", [
    ([SRGenTrigger(window=4, k=1.0, min_std=0.1, min_threshold=0.0, warmup_threshold=2.0)], None, 3),
    ([StepTrigger(threshold=1.0)], [[5], [1, 2]], 2),
    ([StepTrigger(threshold=0.9, field="self_certainty", measure="tail", tail=2),
      StepTrigger(threshold=1.5, measure="min", fires_when="below"), StepTrigger(threshold=6, measure="count")],
     [[5], [3, 4]], 4),
    ([StepTrigger(threshold=1.2, measure="mean"), SRGenTrigger(window=3, k=1.5, min_std=0.0, min_threshold=0.5,
                                                               warmup_threshold=3.0)], [[0]], 5),
    ([StepTrigger(threshold=0.5)], [[5]], 0),
], ids=["srgen", "step_mean", "three_step_triggers", "step_and_srgen", "no_insertions"])
def test_rule_matches_transcription(triggers, delimiters, max_insertions):
    """Random batches (rows pausing), with the forced tokens fed back as the emitted ones (as in
    generation) in some rows and overridden in others: insertions (positions, trigger, value,
    threshold, inserted tokens) and forced tokens equal the plain-loop transcription's."""
    config = ReflectionConfig(tokens=[7, 8, 7], triggers=triggers, max_insertions=max_insertions,
                              delimiters=delimiters)
    total = 0
    for seed in range(8):
        tokens, values, present = rule_inputs(seed, batch=6, length=70, fields=("entropy", "self_certainty"))
        ours, emitted, was_forced = run_rule(config, tokens, values, present, feed_back=torch.arange(6) < 4)
        for row in range(6):
            row_values = {f: v[row].tolist() for f, v in values.items()}
            expected, forced_steps = transcribed_rule(emitted[row].tolist(), row_values, present[row].tolist(), config)
            assert was_forced[row].nonzero().flatten().tolist() == forced_steps, (seed, row)
            assert len(ours[row]) == len(expected) <= max_insertions, (seed, row, ours[row], expected)
            for got, want in zip(ours[row], expected):
                assert (got.position, got.trigger, got.inserted) == (want[0], want[1], want[4]), (seed, row, got, want)
                assert got.value == want[2], (got, want)
                assert got.threshold == pytest.approx(want[3], rel=1e-6), (got, want)
            if row < 4:
                assert all(entry.inserted == 3 or entry.position + 3 > int(present[row].sum()) for entry in ours[row])
            total += len(ours[row])
    assert (total > 20) if max_insertions else total == 0


def test_insertion_points_replays_the_online_rule():
    config = ReflectionConfig(tokens=[7, 8], triggers=[StepTrigger(threshold=1.1), SRGenTrigger(
        window=3, k=1.0, min_std=0.0, min_threshold=0.0, warmup_threshold=2.5)], max_insertions=3, delimiters=[[5]])
    tokens, values, present = rule_inputs(11, batch=4, length=50, fields=("entropy",))
    present[:] = True
    ours, tokens, _ = run_rule(config, tokens, values, present, feed_back=torch.ones(4, dtype=torch.bool))
    for row in range(4):
        assert insertion_points(tokens[row], {"entropy": values["entropy"][row]}, config) == ours[row]
        assert insertion_points(tokens[row].tolist(), {"entropy": values["entropy"][row].tolist()}, config) == ours[row]
    assert sum(map(len, ours)) > 3
    with pytest.raises(ValueError, match="histories must hold 'entropy'"):
        insertion_points(tokens[0], {"self_certainty": values["entropy"][0]}, config)
    with pytest.raises(ValueError, match=r"histories\['entropy'\] has shape"):
        insertion_points(tokens[0], {"entropy": values["entropy"][0][:-1]}, config)
    assert isinstance(ours[0][0] if ours[0] else Insertion(0, 0, 0.0, 0.0, 0), Insertion)


def test_take_and_put_rows_round_trip():
    config = ReflectionConfig(tokens=[1], triggers=[StepTrigger(threshold=0.0, measure="tail", tail=2),
                                                    SRGenTrigger()], delimiters=[[2]], max_insertions=2)
    rules = ReflectionRules.build(config)
    state = new_state(rules, 4, "cpu")
    values = {"entropy": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    state, _ = observe_distribution(rules, state, values, torch.ones(4, dtype=torch.bool))
    state = observe_token(rules, state, torch.tensor([2, 0, 2, 0]), torch.ones(4, dtype=torch.bool))
    rows = torch.tensor([2, 0])
    part = take_rows(state, rows)
    assert part.position.shape == (2,) and part.accumulator.recent.shape == (2, 1, 2)
    rebuilt = put_rows(new_state(rules, 4, "cpu"), rows, part)
    assert torch.equal(rebuilt.forcing[rows], state.forcing[rows])
    assert torch.equal(rebuilt.cutter.index[rows], state.cutter.index[rows])
    assert insertions_of(state)[0] == [Insertion(1, 0, 1.0, 0.0, 0)] and insertions_of(state)[1] == []
    assert reflection.__all__ and steps.__all__
