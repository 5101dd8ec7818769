"""What differs between the transformers releases fusedecode.hf supports (4.5x and 5.x).

Each answer is read from transformers itself (a signature, a dataclass field), never from a version
string, and never from one model's override of a generation method (models override them with
``**kwargs`` signatures that hide what the base class does).
"""

import dataclasses
import functools
import inspect

import torch

# Where ``generate`` keeps the cache in ``model_kwargs`` and in its outputs: ``cache`` since 5.2x,
# ``past_key_values`` before (``cache_params`` for Mamba-style models in 4.x/5.1x), and the names of
# a few legacy models.
CACHE_NAMES = ("cache", "past_key_values", "cache_params", "state", "mems", "past_buckets_states")


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
    >= 5.2x, ``past_key_values`` before; the old name is deprecated there and removed in 5.40), or
    None when the forward takes neither."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def output_cache_field(output_class):
    """The field of a ``generate`` output dataclass that holds the cache (``cache`` or ``past_key_values``)."""
    names = {field.name for field in dataclasses.fields(output_class)}
    return next(name for name in ("cache", "past_key_values") if name in names)


@functools.lru_cache(maxsize=None)
def slices_by_next_sequence_length():
    """True where ``GenerationMixin.prepare_inputs_for_generation`` takes the new tokens' count as
    ``next_sequence_length`` (transformers 5); transformers 4 slices by ``cache_position`` instead.
    Asked of the base class: a model's own override may hide the keyword behind ``**kwargs``."""
    from transformers.generation.utils import GenerationMixin

    return "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def decoder_module(model):
    """The transformer under a causal LM's head (its output is what ``lm_head`` reads), or None.
    ``get_decoder()`` where it gives one; transformers 4 lacks it for GPT-2, GPT-NeoX, Falcon, Bloom,
    whose ``base_model`` is that transformer (while Gemma3ForCausalLM's ``base_model`` is itself there)."""
    for candidate in (model.get_decoder() if hasattr(model, "get_decoder") else None, model.base_model):
        if isinstance(candidate, torch.nn.Module) and candidate is not model:
            return candidate
    return None
