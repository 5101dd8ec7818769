"""fusedecode inside vLLM: per-token uncertainty, DeepConf's online early stop and self-certainty
Best-of-N, measured by one fused ``logit_stats`` pass per engine step (no logprobs path).

This package imports without vLLM; vLLM is needed to run it (``pip install fusedecode[vllm]``).

- ``FusedecodeLogitsProcessor``: the logits processor (vLLM's V1 model runner). Installed fusedecode
  declares it in the ``vllm.logits_processors`` entry point, so every engine loads it; or pass
  ``LLM(logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"])``. It works only for the
  requests that ask (``SamplingParams.extra_args``).
- ``generate(llm, prompts, sampling_params, *, temperature=None, topk=0, confidence_stop=None,
  reflection=None, delimiters=None)``: the vLLM outputs plus, per completion, a ``TraceStats`` of 1-D
  float32 tensors over its tokens (entropy, varentropy, self_certainty, logsumexp, max_logprob,
  token_logprob, topk_confidence), with ``delimiters`` its per-step statistics and with
  ``reflection`` (a ``fusedecode.reflection.ReflectionConfig``) the insertions the engine made.
- ``ConfidenceStop(window, threshold, topk=20)``: DeepConf's early stop for ``generate``.
- ``deepconf(llm, prompt, ...)``: DeepConf online (calibrate on warm-up traces, sample with the early
  stop, confidence-weighted vote); ``best_of_n(llm, prompt, ...)``: self-certainty Borda voting. The
  measures and votes are those of ``fusedecode.confidence``, shared with ``fusedecode.hf``.
- ``extra_args(...)``: the ``extra_args`` of a request you submit yourself (the early stop in
  ``llm.generate`` or through a server's ``vllm_xargs``).
- ``StatsCollector``: the caller's end of the statistics channel (``generate`` uses a shared one).

See docs/vllm.md for the semantics, the channel and what is not supported.
"""

from ._api import (BestOfNResult, ConfidenceStop, DeepConfResult, Result, TraceStats, best_of_n, check_engine,
                   deepconf, default_collector, extra_args, generate)
from ._channel import StatsCollector

__all__ = ["FusedecodeLogitsProcessor", "generate", "deepconf", "best_of_n", "ConfidenceStop", "TraceStats", "Result",
           "DeepConfResult", "BestOfNResult", "extra_args", "StatsCollector", "default_collector", "check_engine"]


def __getattr__(name):
    # The processor subclasses vLLM's interface, so it is imported only when asked for.
    if name == "FusedecodeLogitsProcessor":
        from .processor import FusedecodeLogitsProcessor
        return FusedecodeLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
