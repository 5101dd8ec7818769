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
``fusedecode_key``, ``fusedecode_channel``, ``fusedecode_authkey``
                                        where the statistics go (set by ``fusedecode.vllm.generate``)
======================================  =====================================================================

Nothing here imports vLLM: ``validate_params`` runs in the API server's process, and these checks are
unit-tested without vLLM.
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional

from .. import _validation
from ..ops.logit_stats import MAX_TOPK  # logit_stats' limit

PREFIX = "fusedecode_"
TEMPERATURE, TOPK = PREFIX + "temperature", PREFIX + "topk"
WINDOW, THRESHOLD = PREFIX + "deepconf_window", PREFIX + "deepconf_threshold"
KEY, CHANNEL, AUTHKEY = PREFIX + "key", PREFIX + "channel", PREFIX + "authkey"
KNOWN_KEYS = (TEMPERATURE, TOPK, WINDOW, THRESHOLD, KEY, CHANNEL, AUTHKEY)

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

    key, channel, authkey = _check_delivery(extra_args)
    return RequestOptions(temperature=temperature, topk=topk, window=window, threshold=threshold, key=key,
                          channel=channel, authkey=authkey)


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


def extra_args_for(*, temperature=None, topk=0, window=None, threshold=None, key=None, channel=None, authkey=None):
    """The ``fusedecode_*`` entries of ``extra_args`` for these options (None and the defaults left out)."""
    extra = {}
    if temperature is not None:
        extra[TEMPERATURE] = temperature
    if topk:
        extra[TOPK] = topk
    if window is not None or threshold is not None:
        extra[WINDOW], extra[THRESHOLD] = window, threshold
    if key is not None:
        extra[KEY], extra[CHANNEL], extra[AUTHKEY] = key, channel, authkey
    return extra
