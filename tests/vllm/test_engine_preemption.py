"""fusedecode.vllm under preemption and slot reuse: an in-process engine (the processor runs in this
process, so its counters are visible) with 2 batch slots and a KV cache of 3 blocks of 32 tokens, far
less than the requests need. The processor is loaded twice, through the ``vllm.logits_processors``
entry point declared in pyproject.toml and by class: one instance must stay inert."""

import os
import sys

import pytest

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")

import fusedecode.vllm as fv  # noqa: E402
from engine_helpers import (EOS, PROMPTS, first_stop, make_llm, max_difference, shutdown, threshold_between,  # noqa: E402
                            window_means, write_entry_point)
from vllm import SamplingParams  # noqa: E402

MAX_TOKENS = 50  # two requests of ~60 tokens need 4 blocks: one is preempted


def processors(llm):
    """The engine's FusedecodeLogitsProcessor instances (in-process engine: the worker is here), from
    the V1 runner's input batch or Model Runner V2's sampler."""
    from fusedecode.vllm.processor import FusedecodeLogitsProcessor
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    if getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", False):
        candidates = runner.sampler.logits_processors
    else:
        candidates = runner.input_batch.logitsprocs.all
    return [p for p in candidates if isinstance(p, FusedecodeLogitsProcessor)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("entry_point")
    points = write_entry_point(directory)
    assert list(points.values()) == ["fusedecode.vllm.processor:FusedecodeLogitsProcessor"]
    sys.path.insert(0, str(directory))
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        engine = make_llm(max_num_seqs=2, block_size=32, num_gpu_blocks_override=3,
                          logits_processors=[fv.FusedecodeLogitsProcessor])
        yield engine
        shutdown(engine)
    finally:
        import vllm.envs
        if hasattr(vllm.envs, "disable_envs_cache"):  # the in-process engine cached the environment
            vllm.envs.disable_envs_cache()
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
        sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def active(llm):
    instances = processors(llm)
    assert len(instances) == 2, "the entry point and the class each build one instance"
    working = [p for p in instances if not p.inert]
    assert len(working) == 1
    return working[0]._v1 or working[0]._v2


def test_loaded_twice_one_inert(llm, active):
    before = active.counters["traces"]
    results = fv.generate(llm, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8), temperature=1.0)
    assert active.counters["traces"] - before == 2
    assert all(len(r.stats[0].entropy) == len(r.request_output.outputs[0].token_ids) for r in results)


def test_preemption_and_slot_reuse(llm, active):
    resumed = active.counters["resumed"]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=17, seed=7)
    results = fv.generate(llm, PROMPTS, params, topk=5)
    assert active.counters["resumed"] > resumed, "the KV cache is too small for no preemption"
    assert [len(r.stats) for r in results] == [2] * len(PROMPTS)
    assert max_difference(results, temperature=1.0, topk=5) <= 1e-5


def test_greedy_unchanged_under_preemption(llm, active):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17)
    resumed = active.counters["resumed"]
    results = fv.generate(llm, PROMPTS, params, temperature=1.0, topk=3)
    assert active.counters["resumed"] > resumed
    plain = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(r.request_output.outputs[0].token_ids) for r in results] == [list(o.outputs[0].token_ids)
                                                                              for o in plain]
    assert max_difference(results, temperature=1.0, topk=3) <= 1e-5


def test_deepconf_windows_survive_preemption(llm, active):
    window = 8
    params = SamplingParams(n=2, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=17, seed=21)
    free = fv.generate(llm, PROMPTS, params, topk=5)
    # The lowest groups of these traces lie late, after the KV cache ran out: stops after a preemption.
    threshold = threshold_between([window_means(s.topk_confidence, window).min() for r in free for s in r.stats], 0.3)
    resumed = active.counters["resumed"]
    results = fv.generate(llm, PROMPTS, params, confidence_stop=fv.ConfidenceStop(window, threshold, topk=5))
    assert active.counters["resumed"] > resumed
    stopped = 0
    for result in results:
        for completion, stats in zip(result.request_output.outputs, result.stats):
            position = first_stop(stats.topk_confidence, window, threshold)
            assert stats.stopped == (position is not None)
            if position is not None:
                assert len(completion.token_ids) == position + 1 and completion.token_ids[-1] == EOS
                stopped += 1
    assert 0 < stopped < 2 * len(PROMPTS)


def test_abort_in_process(llm, active):
    collector = fv.default_collector()
    keys = collector.open_keys(2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17)
    try:
        for request_id, prompt, key in (("inproc-0", PROMPTS[3], keys[0]), ("inproc-1", PROMPTS[4], keys[1])):
            request = params.clone()
            request.extra_args = {"fusedecode_temperature": 1.0, **collector.extra_args(key)}
            engine.add_request(request_id, prompt, request)
        for _ in range(5):
            engine.step()
        engine.abort_request(["inproc-0"])
        finished = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        assert list(finished) == ["inproc-1"]
        output = finished["inproc-1"]
        received = collector.take(keys[1], [list(output.outputs[0].token_ids)], timeout=60, poll=engine.step)
        result = fv.Result(output, [fv._api._trace_stats(r, s, False) for r, s in received])
        assert max_difference([result], temperature=1.0, topk=0) <= 1e-5
        assert collector.trace_count(keys[0]) == 1
    finally:
        collector.release(keys)
    # The aborted trace is forgotten at the next batch change once vLLM dropped its params.
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    if hasattr(active, "_rows"):  # V1: traces are forgotten once vLLM drops their params
        parked = [trace for trace in active.book.by_table.values() if trace not in active._rows.values()]
        assert all(trace.engine.params_ref() is not None for trace in parked)
