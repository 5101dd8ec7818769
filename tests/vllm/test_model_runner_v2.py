"""Model Runner V2 (the GPU default since vLLM 0.25) is refused, not served by a stub: vLLM's V2 loader
accepts the class (so the entry point does not stop a V2 engine from starting), a request that asks
for statistics under V2 gets an error naming VLLM_USE_V2_MODEL_RUNNER=0, and generate refuses a V2
engine before it submits anything. V2 itself cannot run on vLLM's CPU build (no Triton backend), so
these checks build the processor the way V2's loader does, without an engine."""

from types import SimpleNamespace

import pytest
import torch

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")
v2_loader = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.loader",
                                reason="this vLLM has no Model Runner V2")

import fusedecode.vllm as fv  # noqa: E402
from vllm import SamplingParams  # noqa: E402

NAME = "fusedecode.vllm:FusedecodeLogitsProcessor"


def test_v2_loader_accepts_the_class():
    assert v2_loader._load_v2_logitsprocs_by_fqcns([NAME]) == [fv.FusedecodeLogitsProcessor]
    assert v2_loader._load_v2_logitsprocs_by_fqcns([fv.FusedecodeLogitsProcessor]) == [fv.FusedecodeLogitsProcessor]


def test_v2_refuses_a_request_that_asks_and_tells_the_caller():
    processor = fv.FusedecodeLogitsProcessor(SimpleNamespace(), SimpleNamespace())  # V2's (config, req_states)
    assert processor.is_argmax_invariant() is False
    with fv.StatsCollector() as collector:
        asking, quiet = collector.open_keys(2)
        params = SamplingParams(max_tokens=4, extra_args={"fusedecode_topk": 3, **collector.extra_args(asking)})
        assert processor.add_request(0, params) is False  # V2 then never calls apply for it
        assert processor.add_request(1, SamplingParams(max_tokens=4)) is False
        with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            collector.take(asking, [[]], timeout=30)
        logits = torch.randn(2, 17)
        assert torch.equal(processor.apply(logits.clone(), None), logits)
        with pytest.raises(TimeoutError):  # no refusal (and no records) for a request that did not ask
            collector.take(quiet, [[1]], timeout=0.5)


def test_generate_refuses_a_v2_engine():
    config = SimpleNamespace(use_v2_model_runner=True, scheduler_config=SimpleNamespace(async_scheduling=False),
                             speculative_config=None, model_config=SimpleNamespace(logits_processors=[NAME]))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        fv.generate(llm, ["1+2="], SamplingParams(max_tokens=4))
    config.use_v2_model_runner = False
    config.scheduler_config.async_scheduling = True
    with pytest.raises(ValueError, match="async_scheduling=False"):
        fv.generate(llm, ["1+2="], SamplingParams(max_tokens=4))
