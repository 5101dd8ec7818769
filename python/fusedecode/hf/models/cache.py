"""Where a model's key/value cache is: the keyword ``forward`` takes it by, the name ``generate``
keeps it under (in ``model_kwargs`` and in its outputs), and whether it already holds context. The
names per transformers release are ``architectures.CACHE_KEYWORDS`` and ``CACHE_NAMES``; each answer
is read from transformers itself (a signature, a dataclass field), never from a version string."""

import dataclasses
import inspect

from .architectures import CACHE_KEYWORDS, CACHE_NAMES


def find_cache(model_kwargs):
    """The cache ``generate`` prepared in ``model_kwargs``, under whichever name this release uses."""
    return next((model_kwargs[name] for name in CACHE_NAMES if model_kwargs.get(name) is not None), None)


def cache_is_filled(cache):
    """Whether a cache already holds context: keys in an attention layer, or a recurrent state (the
    linear-attention layers of Mamba-style caches in 5.x track no sequence length)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        seq_length = getattr(cache, "get_seq_length", None)
        return seq_length is not None and seq_length() > 0
    for layer in layers:
        if any(getattr(layer, "has_previous_state", {}).values()):
            return True
        seq_length = getattr(layer, "get_seq_length", None)
        if seq_length is not None and seq_length() > 0:
            return True
    return False


def cache_keyword(model):
    """The keyword the model's ``forward`` takes its key/value cache by (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before), or None when the forward takes neither."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def output_cache_field(output_class):
    """The field of a ``generate`` output dataclass that holds the cache (``cache`` or ``past_key_values``)."""
    names = {field.name for field in dataclasses.fields(output_class)}
    return next(name for name in CACHE_KEYWORDS if name in names)
