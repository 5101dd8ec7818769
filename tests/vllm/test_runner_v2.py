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

from fusedecode.vllm._api import _trace_stats
from fusedecode.vllm._channel import StatsCollector
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
