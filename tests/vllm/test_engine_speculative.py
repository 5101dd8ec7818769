"""Speculative decoding on the real engine (vLLM's n-gram drafter, 3 draft tokens): each emitted token,
accepted draft or bonus, carries the statistics of the row it was sampled from, and DeepConf stops
where the rule says. Model Runner V2 only: vLLM's V1 runner loads no custom logits processor with
speculative decoding, and ``generate`` refuses it there (tests/vllm/test_mrv2_classes.py)."""

import os

import pytest

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")

import fusedecode.vllm as fv  # noqa: E402
from engine_helpers import (EOS, PROCESSOR, PROMPTS, first_stop, make_llm, max_difference, shutdown,  # noqa: E402
                            threshold_between, window_means)
from vllm import SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1",
                                reason="speculative decoding with a custom processor needs Model Runner V2")
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(max_num_seqs=8, logits_processors=[PROCESSOR], speculative_config=SPECULATIVE,
                      disable_log_stats=False)
    yield engine
    shutdown(engine)


def accepted_draft_tokens(llm):
    return sum(getattr(metric, "value", 0) for metric in llm.get_metrics()
               if metric.name == "vllm:spec_decode_num_accepted_tokens")


@pytest.fixture(scope="module")
def greedy_results(llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17)
    before = accepted_draft_tokens(llm)
    results = fv.generate(llm, PROMPTS, params, temperature=1.0, topk=5)
    return results, accepted_draft_tokens(llm) - before


def test_statistics_of_accepted_drafts_and_bonus_tokens_equal_vllms_distribution(greedy_results):
    results, accepted = greedy_results
    assert accepted > 20, "the drafter's tokens were accepted (rows of several tokens per request)"
    assert max_difference(results, temperature=1.0, topk=5) <= 1e-5


def test_greedy_output_equals_the_engine_without_speculation(greedy_results):
    plain = make_llm(max_num_seqs=8, logits_processors=[PROCESSOR])
    try:
        expected = plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    finally:
        shutdown(plain)
    results, _ = greedy_results
    assert [list(r.request_output.outputs[0].token_ids) for r in results] == [list(o.outputs[0].token_ids)
                                                                              for o in expected]


def test_deepconf_stops_where_the_rule_says_under_speculation(llm, greedy_results):
    window = 4
    free, _ = greedy_results
    threshold = threshold_between([window_means(r.stats[0].topk_confidence, window).min() for r in free], 0.5)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=17)
    stopped = fv.generate(llm, PROMPTS, params, temperature=1.0,
                          confidence_stop=fv.ConfidenceStop(window=window, threshold=threshold, topk=5))
    early = 0
    for free_result, result in zip(free, stopped):
        free_tokens = list(free_result.request_output.outputs[0].token_ids)
        tokens, stats = list(result.request_output.outputs[0].token_ids), result.stats[0]
        position = first_stop(free_result.stats[0].topk_confidence, window, threshold)
        if position is None or free_tokens[position] == EOS:
            assert tokens == free_tokens
            continue
        assert stats.stopped and len(tokens) == position + 1 and tokens[-1] == EOS
        assert tokens[:position] == free_tokens[:position]
        early += 1
    assert early >= 2, "the threshold should stop several traces before their end"
    assert max_difference(stopped, temperature=1.0, topk=5) <= 1e-5
