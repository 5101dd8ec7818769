"""``deepconf_generate``: DeepConf (Fu et al., 2025) in one ``generate`` call, with the options of the
DeepConf ``custom_generate`` repositories on the Hugging Face Hub (``enable_conf``,
``enable_early_stopping``, ``window_size``, ``threshold``, ``conf_topk``, ``output_confidences``,
warm-up calibration by ``deepconf_variant`` / ``deepconf_eta`` / ``deepconf_warmup_confidences``),
plus a warm-up run inside the call (``deepconf_warmup_traces``) that calibrates one threshold per
prompt.

It wraps plain ``model.generate``: the online stop is ``ConfidenceStopping`` (its processor after
the caller's processors, before transformers' sampling warpers), the recording an
``UncertaintyProcessor``, the calibration and trace measures ``fusedecode.confidence``. So its
tokens are exactly those of ``generate`` with ``ConfidenceStopping`` passed by hand, and without the
stop exactly those of plain ``generate``. ``examples/hub/deepconf`` is the Hub folder of this function
(``python -m fusedecode hub-export``).
"""

from dataclasses import dataclass, fields
from typing import Optional

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._validation import ArgumentTypeError, check_float, check_int
from ..confidence import DEEPCONF_WINDOW, confidence_threshold, lowest_group_confidence
from ..ops.logit_stats import MAX_TOPK
from ._custom_generate import class_generate, refuse_encoder_decoder
from .processors import ConfidenceStopping, UncertaintyProcessor, check_confidence_threshold

# The fraction of warm-up traces a variant keeps above its threshold (the paper's eta).
VARIANT_ETA = {"low": 0.1, "high": 0.9}
# The options that only shape the online stop: given while it is off, they would be ignored.
STOP_OPTIONS = ("threshold", "deepconf_variant", "deepconf_eta", "deepconf_warmup_confidences",
                "deepconf_warmup_traces")


@dataclass
class DeepConfOutput(GenerateDecoderOnlyOutput):
    """``generate`` output of ``deepconf_generate`` with ``return_dict_in_generate=True``: a
    ``GenerateDecoderOnlyOutput`` plus

    - ``confidences``: ``[B, steps]`` float32, each step's ``topk_confidence`` (with
      ``output_confidences=True``); NaN after a row's first EOS;
    - ``lowest_group_confidences``: ``[B]`` float64 (CPU), each row's lowest group confidence over
      its real tokens (``enable_conf=True``): its DeepConf score for ``deepconf_vote``;
    - ``stopped``: ``[B]`` bool, rows the online stop ended (it emitted their EOS);
    - ``threshold``: ``[B]`` float64 (CPU), the threshold each row was held to;
    - ``warmup_sequences``, ``warmup_lowest_group_confidences``: the warm-up traces of
      ``deepconf_warmup_traces`` (prompt-major, as ``num_return_sequences`` orders rows) and their
      lowest group confidences, which also vote in ``deepconf_vote``.
    """

    confidences: Optional[torch.FloatTensor] = None
    lowest_group_confidences: Optional[torch.Tensor] = None
    stopped: Optional[torch.BoolTensor] = None
    threshold: Optional[torch.Tensor] = None
    warmup_sequences: Optional[torch.LongTensor] = None
    warmup_lowest_group_confidences: Optional[torch.Tensor] = None


@dataclass
class _Options:
    """The validated DeepConf options of one call."""

    enable_conf: bool
    enable_early_stopping: bool
    window_size: int
    threshold: object  # None, a float, or a float64 tensor (one per row)
    conf_topk: int
    output_confidences: bool
    keep_percent: Optional[float]  # calibration: the percentage of warm-up traces kept
    warmup_confidences: Optional[list]
    warmup_traces: int

    @property
    def stops(self):
        return self.enable_conf and self.enable_early_stopping

    @property
    def records(self):
        return self.enable_conf or self.output_confidences


def deepconf_generate(model, *args, enable_conf=False, enable_early_stopping=True, window_size=DEEPCONF_WINDOW,
                      threshold=None, conf_topk=20, output_confidences=False, deepconf_variant=None,
                      deepconf_eta=None, deepconf_warmup_confidences=None, deepconf_warmup_traces=0, **generate_kwargs):
    r"""``model.generate(*args, **generate_kwargs)`` with DeepConf's confidence tracking and online stop.

    Args:
        enable_conf: DeepConf on. Off (the default), the call is plain ``generate`` (with the
            confidences recorded if ``output_confidences``).
        enable_early_stopping: the online stop: a row whose group confidence (mean ``topk_confidence``
            of its last ``window_size`` steps) falls below its threshold emits EOS there and ends.
            False: confidences are only tracked (offline DeepConf: vote or filter afterwards).
        window_size: tokens per group (the paper: 2048).
        threshold: the stop threshold: a float, or one per row of the output (``B *
            num_return_sequences``). Or calibrate it on warm-up traces with the options below.
        conf_topk: k of the token confidence ``-mean(top-k log-probs)`` (the paper: 20; at most 64).
        output_confidences: add ``confidences`` ``[B, steps]`` to the output (needs
            ``return_dict_in_generate=True``).
        deepconf_variant: ``"low"`` (keep the top 10% of warm-up traces: the 90th percentile of their
            lowest group confidences) or ``"high"`` (keep 90%: the 10th percentile).
        deepconf_eta: the kept fraction itself, in (0, 1] (overrides the variant's).
        deepconf_warmup_confidences: the lowest group confidences of warm-up traces you generated
            (``fusedecode.confidence.lowest_group_confidence`` of each trace's confidences): one
            threshold for every row.
        deepconf_warmup_traces: generate this many warm-up traces per prompt in this call first (with
            the call's sampling settings and confidence recording) and calibrate one threshold per
            prompt (the paper uses 16).

    Returns:
        What ``generate`` returns; with ``return_dict_in_generate=True`` a ``DeepConfOutput``.

    Example (DeepConf-low calibrated on 4 warm-up traces of each prompt, 8-token groups)::

        >>> import torch
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import bundled_model_path, deepconf_generate
        >>> path = bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> inputs = tokenizer(["12+34=", "47+385="], return_tensors="pt", padding=True)
        >>> _ = torch.manual_seed(0)
        >>> out = deepconf_generate(model, **inputs, enable_conf=True, window_size=8, deepconf_variant="low",
        ...                         deepconf_warmup_traces=4, do_sample=True, num_return_sequences=3,
        ...                         max_new_tokens=30, return_dict_in_generate=True)
        >>> out.sequences.shape[0], out.threshold.shape, out.warmup_sequences.shape[0]
        (6, torch.Size([6]), 8)
    """
    options = _check_options(enable_conf, enable_early_stopping, window_size, threshold, conf_topk,
                             output_confidences, deepconf_variant, deepconf_eta, deepconf_warmup_confidences,
                             deepconf_warmup_traces)
    settings = _Settings(model, generate_kwargs)
    _check_generation(model, options, settings)
    if not options.records:
        return class_generate(model, *args, **generate_kwargs)
    user_processors = list(generate_kwargs.pop("logits_processor", None) or [])
    user_criteria = list(generate_kwargs.pop("stopping_criteria", None) or [])
    warmup = None
    if options.stops and options.warmup_traces:
        warmup = _warm_up(model, args, generate_kwargs, user_processors, user_criteria, options, settings)
    row_thresholds = _row_thresholds(options, warmup, settings) if options.stops else None
    if options.stops:
        stopper = ConfidenceStopping(options.window_size, row_thresholds, options.conf_topk,
                                     eos_token_id=settings.eos_token_ids())
        recorder, criteria = stopper.processor, user_criteria + [stopper]
    else:
        recorder, criteria = UncertaintyProcessor(topk=options.conf_topk), user_criteria
    out = class_generate(model, *args, logits_processor=LogitsProcessorList(user_processors + [recorder]),
                         stopping_criteria=StoppingCriteriaList(criteria), **generate_kwargs)
    if not settings.return_dict:
        return out
    return _output(out, recorder, options, settings, row_thresholds, warmup)


def _check_options(enable_conf, enable_early_stopping, window_size, threshold, conf_topk, output_confidences,
                   variant, eta, warmup_confidences, warmup_traces):
    """The options as an ``_Options``; a clear error for each bad or contradictory one."""
    for name, value in (("enable_conf", enable_conf), ("enable_early_stopping", enable_early_stopping),
                        ("output_confidences", output_confidences)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    window_size = check_int("window_size", window_size, 1)
    conf_topk = check_int("conf_topk", conf_topk, 1, MAX_TOPK)
    warmup_traces = check_int("deepconf_warmup_traces", warmup_traces, 0)
    keep = _kept_fraction(variant, eta)
    _check_threshold_source(enable_conf and enable_early_stopping, threshold, variant, eta, warmup_confidences,
                            warmup_traces, keep)
    if threshold is not None:
        threshold = check_confidence_threshold(threshold)
    if warmup_confidences is not None:
        warmup_confidences = _warmup_values(warmup_confidences)
    return _Options(enable_conf, enable_early_stopping, window_size, threshold, conf_topk, output_confidences,
                    None if keep is None else 100.0 * keep, warmup_confidences, warmup_traces)


def _kept_fraction(variant, eta):
    """The fraction of warm-up traces the calibration keeps: ``eta``, else the variant's, else None."""
    if variant is not None and variant not in VARIANT_ETA:
        raise ValueError(f"deepconf_variant must be one of {sorted(VARIANT_ETA)} or None, got {variant!r}")
    if eta is None:
        return VARIANT_ETA.get(variant)
    eta = check_float("deepconf_eta", eta, 0.0, 1.0)
    if eta == 0:
        raise ValueError("deepconf_eta must be in (0, 1], got 0.0")
    return eta


def _check_threshold_source(stops, threshold, variant, eta, warmup_confidences, warmup_traces, keep):
    """Exactly one way to the stop threshold when the stop is on, and none of the stop's options when
    it is off (they would be ignored)."""
    values = dict(threshold=threshold, deepconf_variant=variant, deepconf_eta=eta,
                  deepconf_warmup_confidences=warmup_confidences, deepconf_warmup_traces=warmup_traces or None)
    given = [name for name in STOP_OPTIONS if values[name] is not None]
    if given and not stops:
        raise ValueError(f"{', '.join(given)} set the online stop, which is off (it needs enable_conf=True and "
                         "enable_early_stopping=True)")
    sources = [name for name in ("threshold", "deepconf_warmup_confidences", "deepconf_warmup_traces") if name in given]
    if len(sources) > 1:
        raise ValueError(f"give the stop threshold one way, not {' and '.join(sources)}")
    if stops and not sources:
        raise ValueError("the online stop needs a threshold: threshold=, or deepconf_warmup_confidences= or "
                         "deepconf_warmup_traces= with deepconf_variant= (or deepconf_eta=); or "
                         "enable_early_stopping=False to only track confidences")
    if sources and sources != ["threshold"] and keep is None:
        raise ValueError(f"{sources[0]} calibrates the threshold: also pass deepconf_variant='low' or 'high' "
                         "(or deepconf_eta=)")
    if sources == ["threshold"] and keep is not None:
        raise ValueError("deepconf_variant / deepconf_eta calibrate a threshold on warm-up traces; an explicit "
                         "threshold= needs neither")


def _warmup_values(values):
    """``deepconf_warmup_confidences`` as a non-empty list of floats (a NaN among them makes the
    calibrated threshold NaN, which is refused)."""
    try:
        array = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("deepconf_warmup_confidences must be a 1-D sequence of floats (one per warm-up trace), "
                         f"got {type(values).__name__}") from None
    if array.dim() != 1:
        raise ValueError(f"deepconf_warmup_confidences must be 1-D (one per warm-up trace), got shape "
                         f"{tuple(array.shape)}")
    if array.numel() == 0:
        raise ValueError("deepconf_warmup_confidences is empty: calibration needs at least one warm-up trace")
    return array.tolist()


class _Settings:
    """The generation settings this wrapper must know before calling ``generate``: a keyword of the
    call, else the call's ``generation_config``, else the model's (the order ``generate`` uses)."""

    def __init__(self, model, generate_kwargs):
        self._kwargs = generate_kwargs
        self._config = generate_kwargs.get("generation_config") or model.generation_config

    def get(self, name, default=None):
        if name in self._kwargs:
            return self._kwargs[name]
        value = getattr(self._config, name, None)
        return default if value is None else value

    @property
    def return_dict(self):
        return bool(self.get("return_dict_in_generate", False))

    def eos_token_ids(self, required=True):
        """The EOS ids as a list; None when there are none and none are ``required``."""
        eos = self.get("eos_token_id")
        if eos is None:
            if not required:
                return None
            raise ValueError("DeepConf's stop emits EOS, but neither the call nor the generation config has an "
                             "eos_token_id: pass eos_token_id=")
        if isinstance(eos, torch.Tensor):
            eos = eos.reshape(-1).tolist()
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _check_generation(model, options, settings):
    """Refuse, before any forward, what the wrapper cannot do exactly."""
    if not options.records:
        return  # plain generate
    refuse_encoder_decoder("deepconf_generate", model, "this model")
    num_beams = settings.get("num_beams", 1)
    if num_beams > 1:
        raise ValueError(f"deepconf_generate does not support beam search (num_beams={num_beams}): confidences "
                         "are recorded per row and step, and beams are reordered between steps")
    if options.output_confidences and not settings.return_dict:
        raise ValueError("output_confidences=True returns the confidences in the output object: also pass "
                         "return_dict_in_generate=True")
    if options.warmup_traces and not settings.get("do_sample", False):
        raise ValueError("deepconf_warmup_traces samples its warm-up traces: pass do_sample=True")
    if options.stops:
        settings.eos_token_ids()  # raises when there is no EOS to emit


@dataclass
class _Warmup:
    sequences: torch.LongTensor
    lowest: list  # per warm-up trace, prompt-major
    traces_per_prompt: int


def _warm_up(model, args, generate_kwargs, user_processors, user_criteria, options, settings):
    """``deepconf_warmup_traces`` traces of every prompt with the call's settings (no streamer),
    recording their confidences."""
    recorder = UncertaintyProcessor(topk=options.conf_topk)
    kwargs = dict(generate_kwargs, streamer=None, num_return_sequences=options.warmup_traces,
                  return_dict_in_generate=True)
    out = class_generate(model, *args, logits_processor=LogitsProcessorList(user_processors + [recorder]),
                         stopping_criteria=StoppingCriteriaList(user_criteria), **kwargs)
    traces = recorder.traces("topk_confidence", out.sequences, settings.eos_token_ids())
    lowest = [lowest_group_confidence(trace, options.window_size) for trace in traces]
    return _Warmup(out.sequences, lowest, options.warmup_traces)


def _row_thresholds(options, warmup, settings):
    """The stop threshold: the explicit one (a float or one per row), the calibrated float, or one
    per output row from each prompt's warm-up traces."""
    if options.threshold is not None:
        return options.threshold
    if options.warmup_confidences is not None:
        return _finite_threshold(confidence_threshold(options.warmup_confidences, options.keep_percent))
    per_prompt = [_finite_threshold(confidence_threshold(warmup.lowest[start:start + warmup.traces_per_prompt],
                                                         options.keep_percent))
                  for start in range(0, len(warmup.lowest), warmup.traces_per_prompt)]
    rows_per_prompt = settings.get("num_return_sequences", 1)
    return torch.tensor(per_prompt, dtype=torch.float64).repeat_interleave(rows_per_prompt)


def _finite_threshold(value):
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"the calibrated threshold is {value}: the warm-up confidences must be finite")
    return value


def _output(out, recorder, options, settings, row_thresholds, warmup):
    """``out`` as a ``DeepConfOutput`` with what the options asked for."""
    eos = settings.eos_token_ids(required=options.stops)
    extra = {}
    if options.output_confidences:
        history = recorder.history("topk_confidence")
        mask = recorder.token_mask(out.sequences, eos).to(history.device)
        extra["confidences"] = torch.where(mask, history[:, :mask.shape[1]], torch.full((), float("nan")))
    if options.enable_conf:
        traces = recorder.traces("topk_confidence", out.sequences, eos)
        extra["lowest_group_confidences"] = torch.tensor(
            [lowest_group_confidence(trace, options.window_size) for trace in traces], dtype=torch.float64)
    if options.stops:
        extra["stopped"] = recorder.stopped
        rows = out.sequences.shape[0]
        extra["threshold"] = (row_thresholds.clone() if isinstance(row_thresholds, torch.Tensor)
                              else torch.full((rows,), row_thresholds, dtype=torch.float64))
    if warmup is not None:
        extra["warmup_sequences"] = warmup.sequences
        extra["warmup_lowest_group_confidences"] = torch.tensor(warmup.lowest, dtype=torch.float64)
    base = {field.name: getattr(out, field.name) for field in fields(out)}
    return DeepConfOutput(**base, **extra)
