"""``fusedecode.vllm.generate`` checks every argument before it submits anything to the engine.

No vLLM needed: a fake ``vllm`` module (``SamplingParams`` only, what ``generate`` imports) and a
fake ``LLM`` whose ``generate`` records the requests it is given. Whether the engine loaded
``FusedecodeLogitsProcessor`` needs vLLM's own classes (tests/vllm/test_mrv2_classes.py and the engine
tests check it); here the fake engine is taken to have loaded it. Each bound is tested on both
sides (the last bad value refused, the first good one submitted) and with NaN; a refused call
must leave the fake engine untouched.
"""

import math
import sys
import types
from types import SimpleNamespace

import pytest

import fusedecode.vllm as fv
from fusedecode.vllm import _api
from fusedecode.reflection import ReflectionConfig
from fusedecode.triggers import SRGenTrigger, StepTrigger
from fusedecode.vllm._options import MAX_TOPK, options_of

VOCAB, EOS = 32, 2


class FakeSamplingParams:
    """The part of ``vllm.SamplingParams`` that ``generate`` uses."""

    def __init__(self, n=1, extra_args=None, temperature=1.0):
        self.n, self.extra_args, self.temperature = n, extra_args, temperature

    def clone(self):
        return FakeSamplingParams(self.n, dict(self.extra_args) if self.extra_args else self.extra_args,
                                  self.temperature)


class Submitted(Exception):
    """Raised by the fake engine: the arguments passed every check and reached ``LLM.generate``."""


class FakeLLM:
    def __init__(self, v2=True, speculative=False, async_scheduling=False):
        model_config = SimpleNamespace(logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"],
                                       get_vocab_size=lambda: VOCAB)
        config = SimpleNamespace(use_v2_model_runner=v2, speculative_config=object() if speculative else None,
                                 scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                                 model_config=model_config)
        self.llm_engine = SimpleNamespace(vllm_config=config)
        self.submitted = None

    def get_tokenizer(self):
        return SimpleNamespace(eos_token_id=EOS)

    def generate(self, prompts, requests, use_tqdm=False):
        self.submitted = (list(prompts), list(requests))
        raise Submitted


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeSamplingParams))
    monkeypatch.setattr(_api, "_processor_loaded", lambda config: True)


@pytest.fixture
def collector():
    with fv.StatsCollector() as collector:
        yield collector


def submit(collector, llm=None, prompts=("1+2=",), params=None, **kwargs):
    """``generate`` on the fake engine: the requests it submitted (``Submitted`` is the success path)."""
    llm = llm or FakeLLM()
    with pytest.raises(Submitted):
        fv.generate(llm, list(prompts), params or FakeSamplingParams(), collector=collector, **kwargs)
    return llm.submitted[1]


def refused(collector, error, match, llm=None, prompts=("1+2=",), params=None, **kwargs):
    llm = llm or FakeLLM()
    with pytest.raises(error, match=match):
        fv.generate(llm, list(prompts), params or FakeSamplingParams(), collector=collector, **kwargs)
    assert llm.submitted is None, "a refused call submitted requests"


def step_config(tokens=(11, 12), delimiters=((3,),), **trigger):
    return ReflectionConfig(list(tokens), StepTrigger(threshold=0.5, **trigger), delimiters=delimiters)


@pytest.mark.parametrize("tail", [0, -1])
def test_step_tail_below_one_is_refused(collector, tail):
    refused(collector, ValueError, "step_tail must be >= 1", step_tail=tail, delimiters=[3])


@pytest.mark.parametrize("tail", [True, 1.0, 1.5, math.nan, "2", None])
def test_step_tail_that_is_not_an_int_is_refused(collector, tail):
    refused(collector, TypeError, "step_tail must be an int", step_tail=tail, delimiters=[3])


@pytest.mark.parametrize("tail", [1, 10 ** 6])
def test_step_tail_of_one_and_more_is_submitted(collector, tail):
    assert len(submit(collector, step_tail=tail, delimiters=[3])) == 1


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_temperature_outside_its_range_is_refused(collector, temperature):
    refused(collector, ValueError, "temperature", temperature=temperature)


@pytest.mark.parametrize("temperature", [1e-3, 0.7, 1.0, 100.0])
def test_temperature_inside_its_range_reaches_the_requests(collector, temperature):
    request, = submit(collector, temperature=temperature)
    assert options_of(request).temperature == pytest.approx(temperature)


@pytest.mark.parametrize("topk", [-1, MAX_TOPK + 1])
def test_topk_outside_zero_to_the_kernel_limit_is_refused(collector, topk):
    refused(collector, ValueError, "topk must be in", topk=topk)


@pytest.mark.parametrize("topk", [1.0, True, math.nan])
def test_topk_that_is_not_an_int_is_refused(collector, topk):
    refused(collector, TypeError, "topk must be an int", topk=topk)


@pytest.mark.parametrize("topk", [0, 1, MAX_TOPK])
def test_topk_at_both_ends_is_submitted(collector, topk):
    request, = submit(collector, topk=topk)
    assert options_of(request).topk == topk


def test_confidence_stop_is_checked(collector):
    refused(collector, TypeError, "confidence_stop must be a ConfidenceStop", confidence_stop={"window": 8})
    stop = fv.ConfidenceStop(window=8, threshold=1.0, topk=5)
    refused(collector, ValueError, "differs from confidence_stop.topk", confidence_stop=stop, topk=4)
    request, = submit(collector, confidence_stop=stop, topk=5)
    options = options_of(request)
    assert (options.window, options.threshold, options.topk) == (8, 1.0, 5)


def test_per_prompt_lists_must_match_the_prompts(collector):
    prompts = ("a", "b")
    refused(collector, ValueError, "sampling_params has 1 entries for 2 prompts", prompts=prompts,
            params=[FakeSamplingParams()])
    stop = fv.ConfidenceStop(window=4, threshold=0.5, topk=3)
    refused(collector, ValueError, "confidence_stop has 3 entries for 2 prompts", prompts=prompts,
            confidence_stop=[stop, None, stop])
    first, second = submit(collector, prompts=prompts, confidence_stop=[stop, None])
    assert options_of(first).window == 4 and options_of(second).window is None


def test_fusedecode_options_given_by_hand_are_refused(collector):
    refused(collector, ValueError, "already holds fusedecode_",
            params=FakeSamplingParams(extra_args={"fusedecode_topk": 3}))
    request, = submit(collector, params=FakeSamplingParams(extra_args={"mine": 1}))
    assert request.extra_args["mine"] == 1, "the caller's own extra_args travel with the request"


def test_the_callers_sampling_params_are_not_modified(collector):
    params = FakeSamplingParams(extra_args={"mine": 1})
    submit(collector, params=params, topk=3)
    assert params.extra_args == {"mine": 1}


def test_delimiters_are_checked_before_submitting(collector):
    refused(collector, ValueError, "delimiters", delimiters=[[]])
    refused(collector, ValueError, "delimiters", delimiters=[-1])
    refused(collector, TypeError, "delimiters", delimiters="\n")
    submit(collector, delimiters=[0, [7, 8]])


def test_reflection_must_be_a_reflection_config(collector):
    refused(collector, TypeError, "ReflectionConfig", reflection={"tokens": [11]})


def test_reflection_needs_model_runner_v2_without_speculation(collector):
    refused(collector, ValueError, "Model Runner V2", llm=FakeLLM(v2=False), reflection=step_config())
    refused(collector, ValueError, "speculative", llm=FakeLLM(speculative=True), reflection=step_config())
    submit(collector, llm=FakeLLM(async_scheduling=True), reflection=step_config())


@pytest.mark.parametrize("where", ["tokens", "delimiters"])
def test_reflection_tokens_must_be_in_the_vocabulary(collector, where):
    def config(token):
        return step_config(tokens=(11, token)) if where == "tokens" else step_config(delimiters=((3,), (token,)))
    refused(collector, ValueError, f"token {VOCAB}, outside the model's vocabulary", reflection=config(VOCAB))
    request, = submit(collector, reflection=config(VOCAB - 1))
    assert options_of(request).reflection == config(VOCAB - 1)


def test_reflection_phrase_with_eos_is_refused(collector):
    refused(collector, ValueError, "EOS id", reflection=step_config(tokens=(11, EOS)))
    submit(collector, reflection=step_config(tokens=(11, EOS + 1)))


def test_reflection_on_fields_the_engine_cannot_give(collector):
    topk_rule = step_config(field="topk_confidence", fires_when="below")
    refused(collector, ValueError, "give topk >= 1", reflection=topk_rule)
    submit(collector, reflection=topk_rule, topk=1)
    submit(collector, reflection=topk_rule, confidence_stop=fv.ConfidenceStop(window=4, threshold=0.5, topk=2))
    refused(collector, ValueError, "not known before the token", reflection=step_config(field="token_logprob"))


def test_srgen_reflection_is_submitted_with_its_rule(collector):
    config = ReflectionConfig([11, 12], SRGenTrigger(), max_insertions=2)
    request, = submit(collector, reflection=config)
    assert options_of(request).reflection == config


def test_an_object_that_is_not_an_engine_is_refused(collector):
    with pytest.raises(TypeError, match="llm must be a vllm.LLM"):
        fv.generate(object(), ["1+2="], FakeSamplingParams(), collector=collector)
