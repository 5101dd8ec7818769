"""``fusedecode.vllm`` on Model Runner V2's bookkeeping, without vLLM (runs in `make test`): the
miniature runner of ``runner_v2_sim.py`` drives ``ModelRunnerV2Recorder`` as vLLM's model runner
does, and the caller's real ``StatsCollector`` receives the records over the real channel. Every
completion's statistics must equal ``logit_stats`` of the rows that produced its tokens, one record
per emitted token, whatever happened to the request: rows reordered, slots reused, preemption and
resume (same slot or another), partial prefill chunks, speculative rows (and the rejection sampler's
split calls), completions sharing one ``SamplingParams``, a shared temperature other than 1,
``ignore_eos`` with ``stop_token_ids``, two tensor-parallel ranks with batch-sharded sampling."""

import numpy as np
import pytest
import torch

from fusedecode.reflection import ReflectionConfig, insertion_points
from fusedecode.steps import step_statistics
from fusedecode.triggers import SRGenTrigger, StepTrigger
from fusedecode.vllm._api import _trace_stats
from fusedecode.vllm._channel import StatsCollector
from fusedecode.vllm._options import extra_args_for
from fusedecode.vllm._runner_v2 import ModelRunnerV2Recorder
from runner_v2_sim import (EOS, VOCAB, Params, Request, Runner, assert_stats_match, expected_stats,
                           window_rule_stop)


@pytest.fixture
def collector():
    with StatsCollector() as collector:
        yield collector


def recorder_factory(spec_tokens=0, tp_size=1, sharded=False):
    return lambda states, rank: ModelRunnerV2Recorder(states, spare_rows=1 + spec_tokens, tp_rank=rank,
                                                      tp_size=tp_size, sharded=sharded)


def run_to_end(runner, pending=(), preempt_at=None, resume_after=1, limit=200):
    """Steps until every request finished; ``pending`` requests join one per step. ``preempt_at``:
    (step, request) preempted then, resumed ``resume_after`` steps later."""
    pending, parked, step = list(pending), [], 0
    while (pending or parked or any(not r.finished for r in runner.running)) and step < limit:
        room = len(runner.free) + sum(request.finished for request in runner.running)
        add = [pending.pop(0)] if pending and room else []
        preempt = []
        if preempt_at is not None and preempt_at[0] == step and preempt_at[1] in runner.running:
            preempt = [preempt_at[1]]
            parked.append((step + resume_after, preempt_at[1]))
        add += [request for when, request in parked if when == step]
        parked = [(when, request) for when, request in parked if when != step]
        runner.step(add=add, preempt=preempt)
        step += 1
    runner.step()  # the step that delivers the last tokens
    runner.step()


def received(collector, key, requests, topk=0):
    """The ``TraceStats`` of each request's completion under ``key``."""
    results = collector.take(key, [request.output for request in requests], timeout=10)
    return [_trace_stats(records, stopped, bool(topk)) for records, stopped in results]


def check(runner, collector, key, requests, temperature=1.0, topk=0):
    for request, stats in zip(requests, received(collector, key, requests, topk)):
        expected = expected_stats(runner, request.name, request.output, temperature, topk)
        assert_stats_match(stats, expected, request.output, topk)
    return True


def asking(collector, key, **options):
    extra = {"fusedecode_topk": options.pop("topk", 0), **collector.extra_args(key)}
    for name in ("window", "threshold"):
        if name in options:
            extra[f"fusedecode_deepconf_{name}"] = options.pop(name)
    return Params(**options, **extra)


def test_rows_reordered_and_slots_reused(collector):
    runner = Runner(recorder_factory(), max_num_reqs=2)
    key, = collector.open_keys(1)
    plain = Request("plain", Params(max_tokens=6), [1, 3])
    requests = [Request(f"r{i}", asking(collector, key, topk=4, max_tokens=5 + i), [4, 5, i]) for i in range(5)]
    run_to_end(runner, [requests[0], plain] + requests[1:])
    assert all(request.finished for request in requests)
    assert check(runner, collector, key, requests, topk=4)
    assert runner.recorder.counters["finished"] >= 3, "finished traces are released when their slot is reused"


def test_screened_head_answer_and_invalid_options(collector):
    runner = Runner(recorder_factory(), max_num_reqs=3)
    key, = collector.open_keys(1)
    answers = runner.step(add=[Request("a", asking(collector, key), [1]), Request("b", Params(), [1]),
                               Request("c", Params(fusedecode_topk=99), [1])])
    assert answers == [True, False, False]  # an invalid request runs without fusedecode


def stop_after(collector, key, window, after, topk=5, max_tokens=14):
    """A request name, the position where DeepConf's rule stops it (> ``after``) and the threshold,
    from a free run of each candidate name."""
    for name in ("x", "x1", "x2", "x3", "x4", "x5", "x6", "x7"):
        runner = Runner(recorder_factory(), max_num_reqs=1)
        free = Request(name, asking(collector, key, topk=topk, max_tokens=max_tokens), [7, 8])
        run_to_end(runner, [free])
        confidence = list(received(collector, key, [free], topk=topk)[0].topk_confidence.double().numpy())
        collector.release([key])
        collector.open_keys(0)
        collector._open_keys.add(key)
        collector._by_key[key] = []
        means = {g: np.mean(confidence[g - window + 1:g + 1]) for g in range(window - 1, len(confidence))}
        late = min((g for g in means if g > after), key=means.get)
        threshold = float(means[late]) + 1e-9
        stop_at = window_rule_stop(confidence, window, threshold)
        if stop_at is not None and stop_at > after and free.output[stop_at] != EOS:
            return name, stop_at, threshold
    raise AssertionError("no candidate request stops late enough")


@pytest.mark.parametrize("where", ["same slot", "reused slot", "free slot"])
def test_preemption_and_resume(collector, where):
    """The preempted request comes back into its own slot, into another slot after its own went to
    another request (its trace parked), or into another slot while its own is still free (vLLM never
    says a slot was freed: its trace is still bound there). It continues its trace every time: one
    trace per completion, and DeepConf's window survives."""
    window = 3
    free_key, key = collector.open_keys(2)
    name, stop_at, threshold = stop_after(collector, free_key, window, after=5)
    runner = Runner(recorder_factory(), max_num_reqs=3)
    victim = Request(name, asking(collector, key, topk=5, max_tokens=14, window=window, threshold=threshold), [7, 8])
    other = Request("y", asking(collector, key, max_tokens=6), [9])
    short = Request("z", asking(collector, key, max_tokens=5), [9])
    runner.step(add=[victim] + ([short] if where == "free slot" else []))
    runner.step()
    runner.step()
    resumed_before = runner.recorder.counters["resumed"]
    old_slot = victim.slot
    runner.step(preempt=[victim])
    runner.step(add=[other] if where == "reused slot" else [])
    runner.step()  # "z" finishes: its slot is freed after the victim's, so the victim lands there
    runner.step(add=[victim])
    assert (victim.slot == old_slot) == (where == "same slot")
    if where == "free slot":
        assert old_slot in runner.free, "the victim's own slot is still free"
    run_to_end(runner)
    assert runner.recorder.counters["resumed"] == resumed_before + 1, "the resumed request continues its trace"
    assert victim.output[stop_at] == EOS and len(victim.output) == stop_at + 1, "DeepConf's window survived"
    stats = received(collector, key, [victim], topk=5)[0]
    assert stats.stopped
    assert_stats_match(stats, expected_stats(runner, name, victim.output, topk=5), victim.output, topk=5)
    assert collector.trace_count(key) == 1 + (where == "reused slot") + (where == "free slot")
    if where == "reused slot":
        assert check(runner, collector, key, [other])


def test_partial_prefill_rows_leave_no_record(collector):
    runner = Runner(recorder_factory(), max_num_reqs=2, chunk=2)  # 7-token prompts: 4 prefill steps
    key, = collector.open_keys(1)
    requests = [Request(f"p{i}", asking(collector, key, max_tokens=4), [1, 2, 3, 4, 5, 6, i]) for i in range(2)]
    run_to_end(runner, requests)
    assert check(runner, collector, key, requests)


def test_completions_sharing_one_params_and_a_shared_temperature(collector):
    runner = Runner(recorder_factory(), max_num_reqs=4)
    key, = collector.open_keys(1)
    shared = asking(collector, key, temperature=0.7, topk=3, max_tokens=7)
    requests = [Request(f"n{i}", shared, [3, i]) for i in range(3)]  # n = 3: one params object
    run_to_end(runner, requests)
    assert check(runner, collector, key, requests, temperature=0.7, topk=3)


def test_mixed_temperatures_in_one_batch(collector):
    runner = Runner(recorder_factory(), max_num_reqs=3)
    key_hot, key_cold = collector.open_keys(2)
    hot = Request("h", asking(collector, key_hot, temperature=1.6, max_tokens=6), [1])
    cold = Request("c", asking(collector, key_cold, temperature=0.0, max_tokens=6), [2])  # greedy: measured at 1
    runner.step(add=[hot, cold])
    run_to_end(runner)
    assert check(runner, collector, key_hot, [hot], temperature=1.6)
    assert check(runner, collector, key_cold, [cold], temperature=1.0)


def test_ignore_eos_with_stop_token_ids_stops_on_the_stop_token(collector):
    runner = Runner(recorder_factory(), max_num_reqs=1)
    key, = collector.open_keys(1)
    # A threshold every window beats: the stop fires as soon as the window is full.
    request = Request("s", asking(collector, key, topk=2, window=4, threshold=1e9, ignore_eos=True,
                                  stop_token_ids=[5], max_tokens=12), [1])
    run_to_end(runner, [request])
    assert request.output[3] == 5 and len(request.output) == 4
    stats = received(collector, key, [request], topk=2)[0]
    assert stats.stopped


@pytest.mark.parametrize("split_apply", [False, True])
def test_speculative_rows(collector, split_apply):
    runner = Runner(recorder_factory(spec_tokens=3), max_num_reqs=3, spec_tokens=3, split_apply=split_apply)
    key, = collector.open_keys(1)
    plain = Request("plain", Params(max_tokens=10), [2])
    requests = [Request(f"s{i}", asking(collector, key, topk=3, max_tokens=11), [1, i]) for i in range(2)]
    run_to_end(runner, [requests[0], plain, requests[1]])
    assert max(runner.rows_per_step) > 3, "speculative rows were used"
    assert check(runner, collector, key, requests, topk=3)


def test_deepconf_stop_with_speculative_rows_follows_the_rule(collector):
    window = 4
    free_key, key = collector.open_keys(2)
    runner = Runner(recorder_factory(spec_tokens=2), max_num_reqs=1, spec_tokens=2)
    free = Request("d", asking(collector, free_key, topk=6, max_tokens=16), [3])
    run_to_end(runner, [free])
    confidence = list(received(collector, free_key, [free], topk=6)[0].topk_confidence.double().numpy())
    means = sorted(np.mean(confidence[g - window + 1:g + 1]) for g in range(window - 1, len(confidence)))
    threshold = float(means[2]) + 1e-6
    stop_at = window_rule_stop(confidence, window, threshold)
    runner = Runner(recorder_factory(spec_tokens=2), max_num_reqs=1, spec_tokens=2, seed=5)
    stopping = Request("d", asking(collector, key, topk=6, max_tokens=16, window=window, threshold=threshold), [3])
    run_to_end(runner, [stopping])
    assert stopping.output[:stop_at] == free.output[:stop_at]
    assert stopping.output[stop_at] == EOS and len(stopping.output) == stop_at + 1


@pytest.mark.parametrize("sharded", [True, False])
def test_two_tensor_parallel_ranks_report_each_row_once(collector, sharded):
    """With batch-sharded sampling each rank gets the rows of its slots and reports them; without
    it (or when vLLM turned it off for a model) both ranks get every row, force the same early stops,
    and still report each row once."""
    key, = collector.open_keys(1)
    runner = Runner(recorder_factory(spec_tokens=1, tp_size=2, sharded=True), max_num_reqs=4, ranks=2,
                    sharded=sharded, spec_tokens=1)
    requests = [Request(f"t{i}", asking(collector, key, topk=2, max_tokens=5 + i, window=3, threshold=0.5), [i, 1])
                for i in range(4)]
    run_to_end(runner, requests)
    assert sorted(request.slot % 2 for request in requests) == [0, 0, 1, 1]
    assert check(runner, collector, key, requests, topk=2)
    assert collector.trace_count(key) == 4, "each completion reported by exactly one rank"
    reported = [recorder.counters["records"] for recorder in runner.recorders]
    assert all(reported) and sum(reported) == sum(request.committed for request in requests)


# ------------------------------------------------------------------------------------------------
# Reflection insertion (fusedecode.reflection's rule, forced inside the engine)

PHRASE = (11, 12)  # the inserted tokens
STEP_ENDS = [[3], [6], [10], [7, 8]]  # one-token delimiters and a two-token one


def reflection_config(trigger, threshold=0.6, max_insertions=2):
    triggers = {"step": [StepTrigger(threshold=threshold)],
                "srgen": [SRGenTrigger(window=2, k=0.0, min_std=0.0, min_threshold=0.0, warmup_threshold=1.0)],
                "min below": [StepTrigger(threshold=threshold, measure="min", fires_when="below")],
                "both": [SRGenTrigger(window=3, k=0.5, min_std=0.0, min_threshold=0.0, warmup_threshold=1.5),
                         StepTrigger(threshold=threshold, measure="tail", tail=2)]}[trigger]
    return ReflectionConfig(PHRASE, triggers, max_insertions=max_insertions, delimiters=STEP_ENDS)


def reflecting(collector, key, config, **options):
    params = asking(collector, key, **options)
    params.extra_args.update(extra_args_for(reflection=config))
    return params


def received_insertions(collector, key, requests, config):
    results = collector.take(key, [request.output for request in requests], timeout=10)
    return [_trace_stats(records, stopped, False, reflection=True, delimiters=config.delimiters)
            for records, stopped in results]


def check_insertions(runner, collector, key, requests, config, temperature=1.0):
    """Every completion: statistics as without reflection, insertions where the rule (replayed
    offline over the recorded statistics) names them, and the phrase in the tokens there."""
    made = []
    for request, stats in zip(requests, received_insertions(collector, key, requests, config)):
        expected = expected_stats(runner, request.name, request.output, temperature)
        assert_stats_match(stats, expected, request.output)
        replay = insertion_points(request.output, {field: getattr(stats, field) for field in config.fields}, config)
        assert stats.insertions == replay, request.name
        for insertion in stats.insertions:
            start = insertion.position
            assert request.output[start:start + insertion.inserted] == list(config.tokens[:insertion.inserted])
            # Cut short only by the end of the request.
            assert insertion.inserted == len(config.tokens) or start + insertion.inserted == len(request.output)
        # Steps of the records equal the offline grouping of the per-token statistics.
        offline = step_statistics(expected.entropy.float(), request.output, config.delimiters)
        for got, want in zip(stats.steps["entropy"], offline):
            assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-5, equal_nan=True)
        made.append(len(stats.insertions))
    return made


@pytest.mark.parametrize("trigger", ["step", "srgen", "min below", "both"])
def test_reflection_inserts_where_the_rule_says(collector, trigger):
    """A batch of six through three slots (reused), a shared temperature other than 1: the engine's
    insertions equal the offline rule's on the recorded statistics, the phrase is in the tokens."""
    config = reflection_config(trigger, threshold={"min below": 0.06, "both": 1.0}.get(trigger, 0.75))
    runner = Runner(recorder_factory(), max_num_reqs=3)
    key, = collector.open_keys(1)
    shared = reflecting(collector, key, config, temperature=0.7, max_tokens=18)
    requests = [Request(f"f{i}", shared, [4, 5, i]) for i in range(6)]
    run_to_end(runner, requests)
    made = check_insertions(runner, collector, key, requests, config, temperature=0.7)
    assert sum(made) >= 3 and max(made) == 2, f"the rule fired too rarely to test it: {made}"
    assert min(made) < 2 or trigger in ("srgen", "both"), f"every completion fired twice: {made}"


def test_reflection_changes_nothing_when_no_trigger_fires(collector):
    key_plain, key_quiet = collector.open_keys(2)
    never = ReflectionConfig(PHRASE, StepTrigger(threshold=1e9), delimiters=STEP_ENDS)
    outputs = []
    for key, params in ((key_plain, asking(collector, key_plain, max_tokens=12)),
                        (key_quiet, reflecting(collector, key_quiet, never, max_tokens=12))):
        runner = Runner(recorder_factory(), max_num_reqs=2)
        requests = [Request(f"g{i}", params, [2, i]) for i in range(3)]
        run_to_end(runner, requests)
        outputs.append([request.output for request in requests])
    assert outputs[0] == outputs[1]
    assert all(stats.insertions == [] for stats in received_insertions(collector, key_quiet, requests, never))


@pytest.mark.parametrize("where", ["same slot", "reused slot"])
def test_reflection_survives_preemption_mid_insertion(collector, where):
    """Preempted right after an insertion started, resumed: the phrase goes on where it stopped and
    the rule's state (insertions made, step, SRGen's window) is the trace's own."""
    config = ReflectionConfig((11, 12, 10, 9), StepTrigger(threshold=0.0), max_insertions=2, delimiters=STEP_ENDS)
    key_free, key = collector.open_keys(2)
    free = Request("m", reflecting(collector, key_free, config, max_tokens=20), [6])
    run_to_end(Runner(recorder_factory(), max_num_reqs=2), [free])
    first = received_insertions(collector, key_free, [free], config)[0].insertions[0].position
    runner = Runner(recorder_factory(), max_num_reqs=2)
    victim = Request("m", reflecting(collector, key, config, max_tokens=20), [6])
    other = Request("o", asking(collector, key, max_tokens=4), [1])
    runner.step(add=[victim])
    while len(victim.output) < first + 2:
        runner.step()
    runner.step(preempt=[victim])
    runner.step(add=[other] if where == "reused slot" else [])
    runner.step(add=[victim])
    run_to_end(runner)
    assert victim.output == free.output, "the resumed trace inserts exactly as without preemption"
    check_insertions(runner, collector, key, [victim], config)


def test_reflection_with_deepconf_stop_and_statistics_only_neighbours(collector):
    """A DeepConf stop on a row the rule wants to force wins (the trace ends); requests without
    reflection in the same batch are never forced."""
    config = reflection_config("srgen", max_insertions=4)
    key, plain_key = collector.open_keys(2)
    runner = Runner(recorder_factory(), max_num_reqs=4)
    stopping = Request("k", reflecting(collector, key, config, topk=2, window=2, threshold=1e9, max_tokens=12), [5])
    plain = [Request(f"p{i}", asking(collector, plain_key, max_tokens=10), [5, i]) for i in range(3)]
    run_to_end(runner, [stopping] + plain)
    assert stopping.output[-1] == EOS and len(stopping.output) == 2, "the stop fired at its first full window"
    assert received(collector, key, [stopping], topk=2)[0].stopped
    for request in plain:
        assert request.output == [int(runner.rows_seen[(request.name, p)].argmax()) for p in range(len(request.output))]
    assert check(runner, collector, plain_key, plain)


def test_reflection_refused_with_speculative_rows_outside_the_vocabulary_and_with_eos(collector):
    for runner, config in ((Runner(recorder_factory(spec_tokens=2), max_num_reqs=1, spec_tokens=2),
                            reflection_config("step")),
                           (Runner(recorder_factory(), max_num_reqs=1),
                            ReflectionConfig([VOCAB], StepTrigger(threshold=0.0), delimiters=[3])),
                           (Runner(recorder_factory(), max_num_reqs=1),
                            ReflectionConfig([11, EOS], StepTrigger(threshold=0.0), delimiters=[3]))):
        key, = collector.open_keys(1)
        request = Request("v", reflecting(collector, key, config, max_tokens=6), [1])
        run_to_end(runner, [request])
        with pytest.raises(RuntimeError, match="speculative decoding|outside the vocabulary|end the request"):
            collector.take(key, [request.output], timeout=5)
        assert PHRASE[0] not in request.output, "a refused request runs without insertion"
        collector.release([key])
