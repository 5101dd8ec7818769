"""What a researcher calls: ``generate`` (vLLM outputs plus per-token statistics), ``deepconf``
(DeepConf online) and ``best_of_n`` (self-certainty Borda voting), on an ``LLM`` that loads
``FusedecodeLogitsProcessor``. vLLM is imported only when they run."""

import math
import threading
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, List, NamedTuple, Optional

import numpy as np
import torch

from .. import confidence
from .._validation import check_int, check_temperature
from ..reflection import Insertion, ReflectionConfig
from ..steps import DEFAULT_TAIL, check_delimiters, step_statistics
from ._channel import STAT_FIELDS, StatsCollector
from ._options import PREFIX, check_threshold, check_topk, check_window, extra_args_for, options_of, parse_options
from ._recorder import ASYNC_REFUSAL

PROCESSOR_NAMES = ("fusedecode.vllm:FusedecodeLogitsProcessor",
                   "fusedecode.vllm.processor:FusedecodeLogitsProcessor")
ENTRY_POINT_GROUP = "vllm.logits_processors"


# Per completion: every per-token statistic of logit_stats' output table (topk_confidence None when
# not recorded), whether DeepConf's early stop ended it, its reflection insertions and its steps.
TraceStats = NamedTuple("TraceStats", [(name, Optional[torch.Tensor]) for name in STAT_FIELDS]
                        + [("stopped", bool), ("insertions", Optional[list]), ("steps", Optional[dict])])
TraceStats.__new__.__defaults__ = (None, None)
TraceStats.__doc__ = """Per-token statistics of one completion: 1-D float32 tensors over its generated tokens, as
    ``fusedecode.logit_stats`` defines them, at the measuring temperature (``token_logprob`` of the
    emitted token; ``topk_confidence`` None when no topk was asked for); ``stopped``: DeepConf's
    early stop ended this completion (its last token is the forced EOS); ``insertions`` (with
    ``reflection``): the list of ``fusedecode.reflection.Insertion`` the engine made, as the rule
    recorded them; ``steps`` (with ``delimiters``): per recorded field, its
    ``fusedecode.steps.StepStatistics`` over the completion's steps."""


class Result(NamedTuple):
    """One prompt: vLLM's ``RequestOutput`` (unchanged) and one ``TraceStats`` per completion, in the
    order of ``request_output.outputs``."""

    request_output: Any
    stats: List[TraceStats]


@dataclass(frozen=True)
class ConfidenceStop:
    """DeepConf's online early stop: a completion whose mean ``topk_confidence`` over its last
    ``window`` tokens (once it has that many) falls below ``threshold`` emits EOS at that token and
    ends, the rule of ``fusedecode.hf.ConfidenceStopping``."""

    window: int
    threshold: float
    topk: int = 20

    def __post_init__(self):
        check_window("window", self.window)
        check_threshold("threshold", self.threshold)
        check_topk("topk", self.topk, minimum=1)


_default_lock = threading.Lock()
_default = None


def default_collector():
    """The process's shared ``StatsCollector`` (made on first use, closed at exit)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = StatsCollector()
        return _default


def _engine_config(llm):
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    if config is None:
        raise TypeError(f"llm must be a vllm.LLM, got {type(llm).__name__}")
    return config


def _processor_loaded(config):
    from .processor import FusedecodeLogitsProcessor
    for entry in getattr(config.model_config, "logits_processors", None) or ():
        if isinstance(entry, type) and issubclass(entry, FusedecodeLogitsProcessor):
            return True
        if isinstance(entry, str) and entry.replace(" ", "") in PROCESSOR_NAMES:
            return True
    from importlib.metadata import entry_points
    return any(point.value.replace(" ", "") in PROCESSOR_NAMES for point in entry_points(group=ENTRY_POINT_GROUP))


def check_engine(llm):
    """``ValueError`` if this engine cannot deliver fusedecode statistics, naming the fix."""
    config = _engine_config(llm)
    if not getattr(config, "use_v2_model_runner", False):  # vLLM's V1 model runner
        if getattr(config.scheduler_config, "async_scheduling", False):
            raise ValueError(ASYNC_REFUSAL)
        if getattr(config, "speculative_config", None) is not None:
            raise ValueError("vLLM's V1 model runner loads no custom logits processor with speculative decoding: "
                             "run Model Runner V2 (vLLM's default) or drop speculative_config")
    if not _processor_loaded(config):
        raise ValueError("FusedecodeLogitsProcessor is not loaded in this engine: install fusedecode (its "
                         "vllm.logits_processors entry point loads it) or pass "
                         "LLM(..., logits_processors=['fusedecode.vllm:FusedecodeLogitsProcessor'])")


def _poll_for(llm):
    """In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) run the step that retires finished
    requests, and so reports their last tokens, only when stepped; multi-process ones run it alone."""
    from vllm.v1.engine.core_client import InprocClient
    engine = llm.llm_engine
    return engine.step if isinstance(engine.engine_core, InprocClient) else None


def _per_prompt(name, value, count, default):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [default if value is None else value] * count


def _request(params, extra):
    if any(isinstance(name, str) and name.startswith(PREFIX) for name in params.extra_args or {}):
        raise ValueError(f"sampling_params.extra_args already holds {PREFIX}* options; "
                         "fusedecode.vllm.generate sets them itself")
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), **extra}
    return params


def _insertions_of(records):
    """The insertions recorded in a completion's records. A record whose ``insertion`` names a
    trigger starts one: at its own token when that token was forced (SRGen's rule), right after it
    when it was free (a step trigger at the step it ends; after a completion's last token nothing
    follows). ``Insertion.inserted`` counts its forced tokens emitted as forced."""
    found = []
    for record in np.flatnonzero(records["insertion"] >= 0):
        start = record + int(records["forced"][record] < 0)
        inserted = 0
        for index in range(start, len(records)):
            if records["forced"][index] < 0 or (index > start and records["insertion"][index] >= 0
                                               and records["forced"][index] >= 0):
                break
            inserted += int(records["token"][index] == records["forced"][index])
        found.append(Insertion(int(records["position"][record]) + start - record, int(records["insertion"][record]),
                               float(records["insertion_value"][record]),
                               float(records["insertion_threshold"][record]), inserted))
    return found


def _trace_stats(records, stopped, has_topk, *, reflection=False, delimiters=None, tail=DEFAULT_TAIL):
    columns = {name: torch.from_numpy(records[name].copy()) for name in STAT_FIELDS}
    if not has_topk:
        columns["topk_confidence"] = None
    steps = None
    if delimiters is not None:
        steps = {name: step_statistics(values, records["token"], delimiters, tail=tail)
                 for name, values in columns.items() if values is not None}
    return TraceStats(stopped=bool(stopped), insertions=_insertions_of(records) if reflection else None, steps=steps,
                      **columns)


def _check_reflection(llm, reflection, topk, stops):
    """``ValueError`` if this engine or these options cannot run ``reflection`` (before anything runs)."""
    if not isinstance(reflection, ReflectionConfig):
        raise TypeError(f"reflection must be a fusedecode.reflection.ReflectionConfig, got {type(reflection).__name__}")
    config = _engine_config(llm)
    if not getattr(config, "use_v2_model_runner", False):
        raise ValueError("reflection insertion runs on vLLM's Model Runner V2 (the default engine), not on the V1 "
                         "model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
    if getattr(config, "speculative_config", None) is not None:
        raise ValueError("reflection insertion forces one token per decode step: it does not run with speculative "
                         "decoding (drop speculative_config)")
    vocab = config.model_config.get_vocab_size()
    largest = reflection.largest_token
    if largest >= vocab:
        raise ValueError(f"reflection holds token {largest}, outside the model's vocabulary ({vocab} tokens)")
    if "topk_confidence" in reflection.fields and not topk and all(stop is None for stop in stops):
        raise ValueError("reflection measures topk_confidence: give topk >= 1")
    if "token_logprob" in reflection.fields:
        raise ValueError("reflection measures token_logprob, which is not known before the token is drawn")
    ending = {llm.get_tokenizer().eos_token_id} & set(reflection.tokens)
    if ending:
        raise ValueError(f"reflection.tokens holds the EOS id {sorted(ending)}: an inserted EOS would end the completion")


def generate(llm, prompts, sampling_params=None, *, temperature=None, topk=0, confidence_stop=None,
             reflection=None, delimiters=None, step_tail=DEFAULT_TAIL, timeout=120.0, use_tqdm=False,
             collector=None):
    """``llm.generate`` plus per-token statistics of every completion, recorded inside the engine.

    Args:
        llm: a ``vllm.LLM`` that loads ``FusedecodeLogitsProcessor`` (the entry point does when
            fusedecode is installed): Model Runner V2 (vLLM's default; speculative decoding and async
            scheduling included), or the V1 model runner with synchronous scheduling.
        prompts, sampling_params: as ``LLM.generate`` (one ``SamplingParams`` or one per prompt;
            default ``SamplingParams()``); ``n > 1`` gives ``n`` completions per prompt.
        temperature: the temperature the statistics are measured at; default: each request's
            sampling temperature (1.0 for greedy requests). DeepConf's official code reads vLLM's
            logprobs, which are at temperature 1.
        topk: k of ``topk_confidence`` (0: not recorded).
        confidence_stop: a ``ConfidenceStop`` (or one per prompt) for DeepConf's early stop; its topk
            is the one recorded (``topk`` must then be 0 or the same).
        reflection: a ``fusedecode.reflection.ReflectionConfig``: reflection insertion inside the engine
            (the rule of ``fusedecode.hf.ReflectionInsertion``, per completion; Model Runner V2
            without speculative decoding). Each ``TraceStats.insertions`` lists what it inserted.
        delimiters, step_tail: cut each completion into reasoning steps (``fusedecode.steps``) at
            these token sequences; ``TraceStats.steps`` then holds, per recorded field, its
            ``StepStatistics`` (``tail`` measure over ``step_tail`` tokens).
        timeout: seconds to wait for the last statistics after vLLM returns.
        collector: a ``StatsCollector`` (default: the process's shared one).

    Returns:
        One ``Result`` per prompt: ``.request_output`` (vLLM's, unchanged) and ``.stats``, one
        ``TraceStats`` per completion. Statistics are of the logits vLLM gives the processor: after
        ``allowed_token_ids``, ``bad_words``, ``min_tokens`` and ``logit_bias``, before penalties
        and temperature (docs/vllm.md).
    """
    from vllm import SamplingParams

    prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    params_list = _per_prompt("sampling_params", sampling_params, len(prompt_list), SamplingParams())
    stops = _per_prompt("confidence_stop", confidence_stop, len(prompt_list), None)
    if temperature is not None:
        check_temperature(temperature)
    check_topk("topk", topk)
    for stop in stops:
        if stop is not None and not isinstance(stop, ConfidenceStop):
            raise TypeError(f"confidence_stop must be a ConfidenceStop, got {type(stop).__name__}")
        if stop is not None and topk not in (0, stop.topk):
            raise ValueError(f"topk={topk} differs from confidence_stop.topk={stop.topk}: one k is recorded per request")
    if delimiters is not None:
        delimiters = check_delimiters(delimiters)
    step_tail = check_int("step_tail", step_tail, 1)
    check_engine(llm)
    if reflection is not None:
        _check_reflection(llm, reflection, topk, stops)
    collector = collector if collector is not None else default_collector()
    keys = collector.open_keys(len(prompt_list))
    try:
        requests = []
        for params, stop, key in zip(params_list, stops, keys):
            extra = extra_args_for(temperature=temperature, topk=stop.topk if stop else topk,
                                   window=stop.window if stop else None, threshold=stop.threshold if stop else None,
                                   reflection=reflection)
            requests.append(_request(params, {**extra, **collector.extra_args(key)}))
        for request in requests:  # what the engine will check too, before anything runs
            options_of(request)
        outputs = llm.generate(prompt_list, requests, use_tqdm=use_tqdm)
        poll = _poll_for(llm)
        results = []
        for output, key, stop in zip(outputs, keys, stops):
            received = collector.take(key, [list(c.token_ids) for c in output.outputs], timeout=timeout, poll=poll)
            has_topk = bool(stop is not None or topk)
            results.append(Result(output, [_trace_stats(records, stopped, has_topk, reflection=reflection is not None,
                                                        delimiters=delimiters, tail=step_tail)
                                           for records, stopped in received]))
        return results
    finally:
        collector.release(keys)


def _sampling_for(sampling_params, count, name):
    from vllm import SamplingParams
    params = SamplingParams() if sampling_params is None else sampling_params
    if params.n != 1:
        raise ValueError(f"sampling_params.n must be 1 (the number of traces is {name}), got {params.n}")
    if isinstance(count, bool) or not isinstance(count, Integral) or count < 1:
        raise ValueError(f"{name} must be an int >= 1, got {count!r}")
    params = params.clone()
    params.n = int(count)
    return params


@dataclass
class DeepConfResult:
    """``deepconf``'s outcome. Per trace (warm-up traces first): ``answers`` and
    ``lowest_group_confidences``; ``stopped`` for the final traces."""

    answer: Any
    votes: dict
    threshold: float
    answers: list
    lowest_group_confidences: list
    stopped: list
    warmup: Result
    final: Result
    num_tokens: int = field(default=0)


def deepconf(llm, prompt, sampling_params=None, *, extract_answer, n_warmup=16, n=240, window=2048, topk=20,
             keep_percent=90, temperature=1.0, timeout=120.0):
    """DeepConf online (Fu et al. 2025) for one prompt, with the early stop inside the engine.

    1. ``n_warmup`` traces, each scored by its lowest group confidence (``window``-token groups of
       ``topk_confidence``); the threshold is ``fusedecode.confidence.confidence_threshold`` of those
       (``keep_percent=90``: DeepConf-high; 10: DeepConf-low).
    2. ``n`` more traces with ``ConfidenceStop(window, threshold, topk)``: a trace whose group
       confidence falls below the threshold emits EOS there and ends.
    3. ``fusedecode.confidence.deepconf_vote`` over all traces: those whose lowest group confidence
       reaches the threshold vote, weighted by it.

    ``extract_answer(text)`` gives a completion's answer (None when there is none). ``sampling_params``
    (``n`` must be 1) sets the sampling; confidence is measured at ``temperature`` (1.0, as DeepConf's
    official code reads vLLM's logprobs). The official default budget is 16 + 240 = 256 traces.
    """
    if not callable(extract_answer):
        raise TypeError("extract_answer must be a callable taking a completion's text")
    warm_params = _sampling_for(sampling_params, n_warmup, "n_warmup")
    final_params = _sampling_for(sampling_params, n, "n")
    if final_params.seed is not None:
        # vLLM seeds a request's n completions seed, seed + 1, ...: without the offset the first final
        # traces would repeat the warm-up traces and be counted twice in the vote.
        final_params.seed += n_warmup
    check_window("window", window)
    warm = generate(llm, prompt, warm_params, temperature=temperature, topk=topk, timeout=timeout)[0]
    warm_lowest = [confidence.lowest_group_confidence(s.topk_confidence, window) for s in warm.stats]
    threshold = confidence.confidence_threshold(warm_lowest, keep_percent=keep_percent)
    if not math.isfinite(threshold):
        raise ValueError(f"the warm-up traces give no finite threshold ({threshold}): their confidences are NaN")
    stop = ConfidenceStop(window, threshold, topk)
    final = generate(llm, prompt, final_params, temperature=temperature, confidence_stop=stop, timeout=timeout)[0]
    final_lowest = [confidence.lowest_group_confidence(s.topk_confidence, window) for s in final.stats]
    completions = list(warm.request_output.outputs) + list(final.request_output.outputs)
    answers = [extract_answer(c.text) for c in completions]
    lowest = warm_lowest + final_lowest
    answer, votes = confidence.deepconf_vote(answers, lowest, threshold)
    return DeepConfResult(answer=answer, votes=votes, threshold=threshold, answers=answers,
                          lowest_group_confidences=lowest, stopped=[s.stopped for s in final.stats], warmup=warm,
                          final=final, num_tokens=sum(len(c.token_ids) for c in completions))


@dataclass
class BestOfNResult:
    """``best_of_n``'s outcome: the voted answer, every answer's vote, and per trace its answer and
    self-certainty (mean over its tokens)."""

    answer: Any
    votes: dict
    answers: list
    self_certainties: list
    result: Result


def best_of_n(llm, prompt, sampling_params=None, *, extract_answer, n=64, power=0.5, temperature=None,
              timeout=120.0):
    """Self-certainty Best-of-N (Kang et al. 2025): ``n`` traces, each scored by its mean
    self-certainty (at ``temperature``, default the sampling temperature), then
    ``fusedecode.confidence.best_of_n`` Borda voting (``power=0``: majority vote)."""
    if not callable(extract_answer):
        raise TypeError("extract_answer must be a callable taking a completion's text")
    params = _sampling_for(sampling_params, n, "n")
    result = generate(llm, prompt, params, temperature=temperature, timeout=timeout)[0]
    certainties = [float(s.self_certainty.double().mean()) if len(s.self_certainty) else math.nan
                   for s in result.stats]
    answers = [extract_answer(c.text) for c in result.request_output.outputs]
    answer, votes = confidence.best_of_n(certainties, answers, power=power)
    return BestOfNResult(answer=answer, votes=votes, answers=answers, self_certainties=certainties, result=result)


def extra_args(*, temperature=None, topk=0, deepconf_window=None, deepconf_threshold=None, reflection=None):
    """``SamplingParams.extra_args`` entries for a request you submit yourself (``llm.generate``, or
    ``vllm_xargs`` of an OpenAI-compatible server): the early stop and reflection insertion (a
    ``ReflectionConfig``, sent as a JSON string) run inside the engine; statistics and the insertion
    records only reach the caller through ``generate``. Validated here as the engine will."""
    extra = extra_args_for(temperature=temperature, topk=topk, window=deepconf_window, threshold=deepconf_threshold,
                           reflection=reflection)
    parse_options(extra)
    return extra

