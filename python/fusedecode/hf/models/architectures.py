"""The architecture table: the per-family facts about Hugging Face models that fusedecode dispatches
on, in one place. A new architecture quirk is an entry here; the modules beside this one (``head``,
``attention``, ``cache``, ``forward``) read these entries and dispatch on no family name of their own.

What an entry misses is caught at run time where it can be: the head's reconstruction is compared
with the model's own logits (``head.check_head``), a layer type outside ``FULL``/``SLIDING`` is
refused (``attention``). ``tests/hf/test_architectures.py`` runs tiny random models of the families
named here (``tests/hf/hf_models.py``: ``FAMILIES``); a new entry gets a family there.
"""

from typing import NamedTuple, Optional, Tuple


def text_config(config):
    """The text model's config of ``config`` (a multimodal config keeps it as ``get_text_config()``)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ---- Output head: the transform a family's forward applies to ``lm_head``'s output ------------------
# An lm_head bias needs no entry (it is the head's own ``bias``). Checked against each model's forward
# in transformers 4.57, 5.17 and 5.24.

class LogitTransformRule(NamedTuple):
    """Where a family's config declares one step of its logit transform: ``model_types`` (None: any
    model whose config has the field; a trailing ``*`` matches a prefix), the config ``field``, and
    the ``step``: "softcap" (``softcap * tanh(z / softcap)``), "scale" (``z * value``) or "divide"
    (``z / value``)."""

    model_types: Optional[Tuple[str, ...]]
    field: str
    step: str

    def applies_to(self, model_type):
        if self.model_types is None:
            return True
        return any(model_type.startswith(name[:-1]) if name.endswith("*") else model_type == name
                   for name in self.model_types)


# Read in order; a later rule that applies replaces an earlier one's value for the same step.
LOGIT_TRANSFORMS = (
    # Gemma 2/3/3n, VaultGemma, nanochat.
    LogitTransformRule(None, "final_logit_softcapping", "softcap"),
    LogitTransformRule(("recurrent_gemma",), "logits_soft_cap", "softcap"),
    # Cohere, Cohere2 (+ MoE).
    LogitTransformRule(("cohere*",), "logit_scale", "scale"),
    # The Granite family and MiniCPM3 (which divides the hidden states before a bias-free lm_head:
    # the same thing) divide by logits_scaling; HyperCLOVA X multiplies by it.
    LogitTransformRule(("granite*", "minicpm3"), "logits_scaling", "divide"),
    LogitTransformRule(("hyperclovax",), "logits_scaling", "scale"),
)


# ---- Attention: what explicit 4D masks and position ids can express -----------------------------------
# The layer types of ``config.layer_types`` that attend a key/value cache (full causal, or within
# ``sliding_window``: a query at position p attends keys at positions > p - window).
FULL, SLIDING = "full_attention", "sliding_attention"
# Attention implementations that read an explicit 4D mask (flash attention only takes padding).
MASKED_ATTENTION = ("eager", "sdpa")
# Layer types that keep a recurrent state instead of a key/value cache (Mamba and the hybrids that mix
# them with attention). transformers >= 5.25 describes Mamba by ``layer_types`` ("linear_attention")
# and no longer marks such models with ``_is_stateful``.
RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding")
# ALiBi: the position bias is built from a 2D padding mask. Bloom and MPT always use it; Falcon (and
# MPT's ``attn_config``) say so with an ``alibi`` flag.
ALIBI_MODEL_TYPES = ("bloom", "mpt")


def uses_alibi(config):
    """Whether the (text) ``config`` declares ALiBi attention."""
    return bool(getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False)
                or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES)


# ---- Cache: where a model and ``generate`` keep it -----------------------------------------------------
# The keyword a model's ``forward`` takes its key/value cache by: ``cache`` in transformers >= 5.2x,
# ``past_key_values`` before (deprecated there, removed in 5.40). The same names are the fields of
# ``generate``'s output dataclasses.
CACHE_KEYWORDS = ("cache", "past_key_values")
# Where ``generate`` keeps the cache in ``model_kwargs``: the keywords above, ``cache_params`` for
# Mamba-style models in 4.x/5.1x, and the names of a few legacy models.
CACHE_NAMES = CACHE_KEYWORDS + ("cache_params", "state", "mems", "past_buckets_states")


# ---- Forward keywords ------------------------------------------------------------------------------------
# How many last positions' logits ``forward`` computes: ``logits_to_keep`` since transformers 4.50,
# ``num_logits_to_keep`` before.
LOGITS_TO_KEEP_KEYWORDS = ("logits_to_keep", "num_logits_to_keep")
