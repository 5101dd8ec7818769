"""How a model's attention layers read explicit masks: which models explicit 4D masks, explicit
position ids and a cache that can be cut describe exactly (``masked_attention_layout``), and the
masks themselves, sliding windows included (``AttentionLayout``).

Any decoder-only HF model built on ``create_causal_mask`` accepts a 4D additive attention mask and
explicit position ids. Sliding-window layers get the window in that mask (per layer type where a
model mixes them), by the rule the model's own mask follows: a query at position p attends keys at
positions > p - window. The per-family facts (layer types, ALiBi, recurrent layers, the attention
implementations that read a 4D mask) are in ``architectures``. ``user`` arguments name the caller
(``tree_speculative``) and ``name`` the model (``"draft_model"``) in error messages.
"""

import inspect
import re

import torch

from .architectures import FULL, MASKED_ATTENTION, RECURRENT_LAYER_TYPES, SLIDING, text_config, uses_alibi
from .cache import cache_keyword
from .hidden import decoder_module

# Decoders that take one prepared mask per layer type: ``if not isinstance(... attention_mask, dict)``.
_TAKES_MASK_MAPPING = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")


class AttentionLayout:
    """Which attention masks a model's layers read, and how to hand them over.

    Per layer type ("full_attention", "sliding_attention") the window (None: full causal), from the
    same fields transformers' own masks and caches use: ``layer_types`` where the config has them
    (Gemma2/3, Cohere2, Qwen2/3 with ``max_window_layers``, Qwen2-MoE in 5.x), otherwise
    ``sliding_window`` for every layer (Mistral, Mixtral, Phi3, ...; not when ``use_sliding_window``
    is False). transformers' window rule is ``key index > query index - window``, i.e. a query at
    position p attends the keys at positions p - window + 1 .. p. A model with one layer type gets
    one 4D mask; a model mixing them gets a dict keyed by layer type, which the decoders that mix
    them accept as prepared masks. Raises ValueError for what cannot be expressed by such masks.
    """

    def __init__(self, model, name, user):
        config = model.config
        text = text_config(config)
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in MASKED_ATTENTION:
            raise ValueError(f"{user} passes a 4D tree attention mask, which only the {MASKED_ATTENTION} "
                             f"attention implementations read; {name} uses {implementation!r} (load it with "
                             "attn_implementation='sdpa')")
        if getattr(text, "attention_chunk_size", None):
            raise ValueError(f"{user} does not support chunked attention ({name} has attention_chunk_size="
                             f"{text.attention_chunk_size})")
        self.cache_keyword = cache_keyword(model)
        if self.cache_keyword is None:
            raise ValueError(f"{user} needs a model whose forward takes a key/value cache; {name} "
                             f"({type(model).__name__}) takes neither cache nor past_key_values")
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if layer_types is None:
            uses_window = window is not None and getattr(text, "use_sliding_window", True) is not False
            layer_types = [SLIDING if uses_window else FULL] * text.num_hidden_layers
        unknown = sorted(set(layer_types) - {FULL, SLIDING})
        if unknown:
            raise ValueError(f"{user} supports full and sliding-window attention layers; {name} has "
                             f"layer types {unknown}")
        if SLIDING in layer_types and not (isinstance(window, int) and window >= 1):
            raise ValueError(f"{name} has sliding-window layers but sliding_window={window!r}")
        self.windows = {kind: (window if kind == SLIDING else None) for kind in (FULL, SLIDING) if kind in layer_types}
        self.dtype = model.dtype
        if len(self.windows) > 1 and not takes_mask_mapping(model):
            raise ValueError(f"{name} ({type(model).__name__}) mixes full and sliding-window layers but its decoder "
                             f"takes a single attention mask, so {user} cannot give each layer its window")

    def masks(self, allowed, query_positions, key_positions):
        """The model's ``attention_mask`` from ``allowed [B, q, S]``: a 4D additive mask ``[B, 1, q, S]``,
        or a dict of them by layer type."""
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        dtype = self.dtype
        masks = {}
        for kind, window in self.windows.items():
            attend = allowed if window is None else allowed & (distance < window)
            mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
            masks[kind] = mask.masked_fill_(~attend, torch.finfo(dtype).min)[:, None]
        return next(iter(masks.values())) if len(masks) == 1 else masks


def takes_mask_mapping(model):
    """Whether the model's decoder takes one prepared attention mask per layer type (a dict)."""
    decoder = decoder_module(model)
    try:
        source = inspect.getsource(type(decoder if decoder is not None else model).forward)
    except (OSError, TypeError):
        return False
    return bool(_TAKES_MASK_MAPPING.search(source))


def masked_attention_layout(model, name, user):
    """Refuse, before any forward, a model that explicit 4D masks, explicit position ids and a
    key/value cache cut to any set of slots cannot run exactly; returns its ``AttentionLayout``."""
    config = text_config(model.config)
    if uses_alibi(config):
        raise ValueError(f"{user} does not support ALiBi attention ({name} is {type(model).__name__}): "
                         "its position bias is built from a 2D padding mask, which cannot express a token tree")
    recurrent = set(getattr(config, "layer_types", None) or ()) & set(RECURRENT_LAYER_TYPES)
    if getattr(model, "_is_stateful", False) or recurrent:
        raise ValueError(f"{user} needs attention with a key/value cache it can cut to the accepted path; "
                         f"{name} ({type(model).__name__}) keeps a recurrent state")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{user} needs a model whose forward takes position_ids; {name} "
                         f"({type(model).__name__}) does not")
    return AttentionLayout(model, name, user)
