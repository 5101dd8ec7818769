"""Reasoning steps and reflection insertion on the real engine (Model Runner V2): per-step
statistics of ``generate(delimiters=)`` equal the offline grouping of the per-token ones, and with
``reflection=`` the engine inserts the phrase exactly where the rule, replayed offline over the
recorded statistics, names it, in a batch of eight greedy completions. The V1 runner refuses
reflection (``generate`` before anything runs; the worker if a request gets there anyway)."""

import os

import pytest

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fusedecode.vllm as fv  # noqa: E402
from engine_helpers import PROCESSOR, PROMPTS, make_llm, shutdown  # noqa: E402
from fusedecode.reflection import ReflectionConfig, insertion_points  # noqa: E402
from fusedecode.steps import step_statistics  # noqa: E402
from fusedecode.triggers import StepTrigger  # noqa: E402
from vllm import SamplingParams  # noqa: E402

MRV2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
SEMICOLON, BAR = 15, 16  # the bundled tokenizer's ';' and '|': a worked answer's step ends
DELIMITERS = [[SEMICOLON], [BAR]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(max_num_seqs=8, logits_processors=[PROCESSOR])
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def free(llm):
    return fv.generate(llm, PROMPTS, GREEDY, temperature=1.0, delimiters=DELIMITERS)


def tokens_of(result):
    return list(result.request_output.outputs[0].token_ids)


def test_step_statistics_equal_the_offline_grouping(free):
    steps = 0
    for result in free:
        stats, tokens = result.stats[0], tokens_of(result)
        for field in ("entropy", "self_certainty", "token_logprob"):
            offline = step_statistics(getattr(stats, field), tokens, DELIMITERS)
            for got, want in zip(stats.steps[field], offline):
                assert torch.equal(got, want) or torch.allclose(got, want, equal_nan=True), field
        steps += len(stats.steps["entropy"].count)
    assert steps >= 2 * len(PROMPTS), "the completions have several steps each"


@pytest.mark.skipif(not MRV2, reason="reflection insertion runs on Model Runner V2")
def test_insertions_where_the_rule_says_in_a_batch(llm, free):
    means = np.concatenate([r.stats[0].steps["entropy"].mean[r.stats[0].steps["entropy"].terminated].numpy()
                            for r in free])
    threshold = float(np.quantile(means, 0.6))
    config = ReflectionConfig([BAR, SEMICOLON], StepTrigger(threshold=threshold), max_insertions=2,
                              delimiters=DELIMITERS)
    results = fv.generate(llm, PROMPTS, GREEDY, temperature=1.0, reflection=config)
    made = []
    for free_result, result in zip(free, results):
        stats, tokens = result.stats[0], tokens_of(result)
        assert stats.insertions == insertion_points(tokens, {"entropy": stats.entropy}, config)
        for insertion in stats.insertions:
            start = insertion.position
            assert tokens[start:start + insertion.inserted] == list(config.tokens)[:insertion.inserted]
        first = stats.insertions[0].position if stats.insertions else len(tokens)
        assert tokens[:first] == tokens_of(free_result)[:first], "greedy: the same tokens up to the first insertion"
        made.append(len(stats.insertions))
    assert sum(made) >= 3 and min(made) < max(made), f"insertions per completion: {made}"


@pytest.mark.skipif(MRV2, reason="the V1 runner's refusal")
def test_v1_runner_refuses_reflection(llm):
    config = ReflectionConfig([BAR], StepTrigger(threshold=0.0), delimiters=DELIMITERS)
    with pytest.raises(ValueError, match="Model Runner V2"):
        fv.generate(llm, PROMPTS[:1], GREEDY, reflection=config)
