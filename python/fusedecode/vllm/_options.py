"""Per-request options of the vLLM processor, read from ``SamplingParams.extra_args``.

The options are flat ``fusedecode_*`` keys, so that the same request works from Python
(``SamplingParams(extra_args={...})``) and through an OpenAI-compatible server, whose
``vllm_xargs`` only carries flat values. A request asks for fusedecode when any such key is present.

======================================  =====================================================================
key                                     meaning
======================================  =====================================================================
``fusedecode_temperature``              temperature the statistics are measured at (float > 0); default: the
                                        request's sampling temperature, 1.0 for greedy requests
``fusedecode_topk``                     k of DeepConf's ``topk_confidence`` (0..64; 0: not recorded); default 0,
                                        or 20 with an early stop
``fusedecode_deepconf_window``          DeepConf online early stop: tokens per group (int >= 1) ...
``fusedecode_deepconf_threshold``       ... and the threshold (finite float); both or neither
``fusedecode_reflection``              reflection insertion (``fusedecode.reflection``): a
                                        ``ReflectionConfig`` as a JSON string (or the same dict), see
                                        ``reflection_extra``; Model Runner V2 without speculative decoding
``fusedecode_key``, ``fusedecode_channel``, ``fusedecode_authkey``
                                        where the statistics go (set by ``fusedecode.vllm.generate``)
======================================  =====================================================================

Nothing here imports vLLM: ``validate_params`` runs in the API server's process, and these checks are
unit-tested without vLLM.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Optional

from .. import _validation
from ..ops.logit_stats import MAX_TOPK  # logit_stats' limit
from ..reflection import ReflectionConfig
from ..triggers import SRGenTrigger, StepTrigger

PREFIX = "fusedecode_"
TEMPERATURE, TOPK = PREFIX + "temperature", PREFIX + "topk"
WINDOW, THRESHOLD = PREFIX + "deepconf_window", PREFIX + "deepconf_threshold"
REFLECTION = PREFIX + "reflection"
KEY, CHANNEL, AUTHKEY = PREFIX + "key", PREFIX + "channel", PREFIX + "authkey"
KNOWN_KEYS = (TEMPERATURE, TOPK, WINDOW, THRESHOLD, REFLECTION, KEY, CHANNEL, AUTHKEY)

DEEPCONF_TOPK = 20  # the paper's k, used when an early stop is asked for without a topk
GREEDY_BELOW = 1e-5  # vLLM treats a sampling temperature below this as greedy
AUTHKEY_BYTES = 32


@dataclass(frozen=True)
class RequestOptions:
    """The validated fusedecode options of one request."""

    temperature: float
    topk: int
    window: Optional[int] = None  # DeepConf early stop when set (with threshold)
    threshold: Optional[float] = None
    reflection: Optional[ReflectionConfig] = None  # reflection insertion when set
    key: Optional[str] = None  # statistics delivery when set (with channel and authkey)
    channel: Optional[str] = None
    authkey: Optional[bytes] = None

    @property
    def stops_early(self):
        return self.window is not None

    @property
    def reports(self):
        return self.channel is not None


def check_topk(name, value, minimum=0):
    return _validation.check_int(name, value, minimum, MAX_TOPK)


def check_window(name, value):
    return _validation.check_int(name, value, 1)


def check_threshold(name, value):
    return _validation.check_float(name, value)


# A trigger's type in the JSON form of a ReflectionConfig.
_TRIGGER_TYPES = {"srgen": SRGenTrigger, "step": StepTrigger}


def reflection_extra(config):
    """The ``fusedecode_reflection`` value of a ``ReflectionConfig``: a JSON string (flat, so that an
    OpenAI-compatible server's ``vllm_xargs`` carries it too), read back by ``parse_reflection``.

    Example::

        >>> from fusedecode.triggers import StepTrigger
        >>> config = ReflectionConfig([8, 9], StepTrigger(threshold=1.0), delimiters=[5])
        >>> reflection_extra(config)[:35]
        '{"tokens":[8,9],"max_insertions":1,'
        >>> parse_reflection(reflection_extra(config)) == config
        True
    """
    if not isinstance(config, ReflectionConfig):
        raise _validation.ArgumentTypeError(f"reflection must be a fusedecode.reflection.ReflectionConfig, "
                                            f"got {type(config).__name__}")
    kinds = {cls: kind for kind, cls in _TRIGGER_TYPES.items()}
    return json.dumps({"tokens": list(config.tokens), "max_insertions": config.max_insertions,
                       "delimiters": None if config.delimiters is None else [list(d) for d in config.delimiters],
                       "triggers": [{"type": kinds[type(t)], **asdict(t)} for t in config.triggers]},
                      separators=(",", ":"))


def parse_reflection(value, name=f"extra_args {REFLECTION}"):
    """The ``ReflectionConfig`` of a ``fusedecode_reflection`` value (JSON string or dict); ``ValueError``
    naming the option for anything malformed."""
    try:
        spec = json.loads(value) if isinstance(value, str) else value
    except ValueError as error:
        raise ValueError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{name} must be a JSON object (see fusedecode.vllm.reflection_extra), got {value!r}")
    unknown = sorted(set(spec) - {"tokens", "max_insertions", "delimiters", "triggers"})
    if unknown or "tokens" not in spec or "triggers" not in spec:
        raise ValueError(f"{name} needs 'tokens' and 'triggers' (optional: 'max_insertions', 'delimiters'); "
                         f"got keys {sorted(spec)}")
    triggers = spec["triggers"]
    if not isinstance(triggers, list) or not all(isinstance(t, dict) for t in triggers):
        raise ValueError(f"{name}: 'triggers' must be a list of objects, got {triggers!r}")
    try:
        built = []
        for trigger in triggers:
            settings = dict(trigger)
            kind = _TRIGGER_TYPES.get(settings.pop("type", None))
            if kind is None:
                raise ValueError(f"a trigger's 'type' must be one of {sorted(_TRIGGER_TYPES)}, got {trigger!r}")
            built.append(kind(**settings))
        return ReflectionConfig(tokens=spec["tokens"], triggers=built, max_insertions=spec.get("max_insertions", 1),
                                delimiters=spec.get("delimiters"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


def _check_delivery(extra):
    """(key, channel, authkey) or (None, None, None); the three come together."""
    given = [name for name in (KEY, CHANNEL, AUTHKEY) if name in extra]
    if not given:
        return None, None, None
    if len(given) != 3:
        missing = sorted({KEY, CHANNEL, AUTHKEY} - set(given))
        raise ValueError(f"extra_args {KEY}, {CHANNEL} and {AUTHKEY} go together; missing {', '.join(missing)}")
    key, channel, authkey = extra[KEY], extra[CHANNEL], extra[AUTHKEY]
    if not isinstance(key, str) or not key:
        raise ValueError(f"extra_args {KEY} must be a non-empty str, got {key!r}")
    if not isinstance(channel, str) or not os.path.isabs(channel):
        raise ValueError(f"extra_args {CHANNEL} must be an absolute path, got {channel!r}")
    try:
        authkey_bytes = bytes.fromhex(authkey) if isinstance(authkey, str) else None
    except ValueError:
        authkey_bytes = None
    if authkey_bytes is None or len(authkey_bytes) != AUTHKEY_BYTES:
        raise ValueError(f"extra_args {AUTHKEY} must be {AUTHKEY_BYTES} bytes as a hex str")
    return key, channel, authkey_bytes


def parse_options(extra_args, sampling_temperature=1.0, ignore_eos=False, stop_token_ids=()):
    """The request's ``RequestOptions``, or None when no ``fusedecode_*`` key is present.

    ``sampling_temperature``, ``ignore_eos`` and ``stop_token_ids`` are the request's own
    ``SamplingParams`` fields. Raises ``ValueError`` naming the option for anything invalid.
    """
    if not extra_args:
        return None
    if not isinstance(extra_args, dict):
        raise ValueError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    names = [name for name in extra_args if isinstance(name, str) and name.startswith(PREFIX)]
    if not names:
        return None
    unknown = sorted(set(names) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"unknown fusedecode option(s) in extra_args: {', '.join(unknown)} "
                         f"(known: {', '.join(KNOWN_KEYS)})")

    if extra_args.get(TEMPERATURE) is not None:
        _validation.check_temperature(extra_args[TEMPERATURE], name=f"extra_args {TEMPERATURE}")
        temperature = float(extra_args[TEMPERATURE])
    else:
        temperature = 1.0 if sampling_temperature < GREEDY_BELOW else float(sampling_temperature)

    window = extra_args.get(WINDOW)
    threshold = extra_args.get(THRESHOLD)
    if (window is None) != (threshold is None):
        raise ValueError(f"extra_args {WINDOW} and {THRESHOLD} go together (DeepConf early stop)")
    if window is not None:
        window = check_window(f"extra_args {WINDOW}", window)
        threshold = check_threshold(f"extra_args {THRESHOLD}", threshold)
        if ignore_eos and not stop_token_ids:
            raise ValueError(f"extra_args {WINDOW}: the DeepConf early stop emits EOS, which ignore_eos=True "
                             "ignores; give stop_token_ids (the first one is emitted) or drop ignore_eos")
        topk = check_topk(f"extra_args {TOPK}", extra_args.get(TOPK, DEEPCONF_TOPK), minimum=1)
    else:
        topk = check_topk(f"extra_args {TOPK}", extra_args.get(TOPK, 0))

    reflection = parse_reflection(extra_args[REFLECTION]) if extra_args.get(REFLECTION) is not None else None
    if reflection is not None and "token_logprob" in reflection.fields:
        raise ValueError(f"extra_args {REFLECTION}: a trigger measures token_logprob, which is not known before the "
                         "token is drawn")
    if reflection is not None and "topk_confidence" in reflection.fields and not topk:
        raise ValueError(f"extra_args {REFLECTION}: a trigger measures topk_confidence, which needs "
                         f"extra_args {TOPK} >= 1")
    key, channel, authkey = _check_delivery(extra_args)
    return RequestOptions(temperature=temperature, topk=topk, window=window, threshold=threshold,
                          reflection=reflection, key=key, channel=channel, authkey=authkey)


def options_of(sampling_params):
    """``parse_options`` of a vLLM ``SamplingParams``."""
    return parse_options(sampling_params.extra_args, sampling_params.temperature,
                         bool(getattr(sampling_params, "ignore_eos", False)),
                         tuple(getattr(sampling_params, "stop_token_ids", None) or ()))


def admitted_options(sampling_params):
    """``options_of`` for a request entering an engine's batch: None (and a warning in the engine log)
    when its options are invalid. ``validate_params`` refuses such a request at admission; if it got
    through anyway it runs without fusedecode, and the engine never goes down for it."""
    try:
        return options_of(sampling_params)
    except ValueError as error:
        logging.getLogger("fusedecode.vllm").warning("fusedecode: ignoring a request with invalid options: %s", error)
        return None


def extra_args_for(*, temperature=None, topk=0, window=None, threshold=None, reflection=None, key=None, channel=None,
                   authkey=None):
    """The ``fusedecode_*`` entries of ``extra_args`` for these options (None and the defaults left out)."""
    extra = {}
    if temperature is not None:
        extra[TEMPERATURE] = temperature
    if topk:
        extra[TOPK] = topk
    if window is not None or threshold is not None:
        extra[WINDOW], extra[THRESHOLD] = window, threshold
    if reflection is not None:
        extra[REFLECTION] = reflection_extra(reflection)
    if key is not None:
        extra[KEY], extra[CHANNEL], extra[AUTHKEY] = key, channel, authkey
    return extra
