"""Tiny random Hugging Face causal LMs and prompts for the fusedecode.hf tests (no hub access).

Import only from test modules that already did ``pytest.importorskip("transformers")``.
"""

import torch
import transformers

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2


def tiny_model(kind="llama", seed=0, layers=2):
    """A 2-layer (by default) Llama- or Qwen2-style model, width 32, vocabulary 96, fixed seed."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS,
                  pad_token_id=PAD, bos_token_id=BOS)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.eval()


def prompts(batch, length, seed=0, padded_rows=1):
    """Random prompts; row r < padded_rows is left-padded by r + 2 positions (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(min(padded_rows, batch)):
        mask[row, :row + 2] = 0
        ids[row, :row + 2] = 0
    return dict(input_ids=ids, attention_mask=mask)


# The decoder families of the architecture matrix: name -> (config class, model class, config fields).
# Llama-style fields are shared; each family adds or renames what its config needs. A field that is
# None in a window argument below means "this family has no sliding-window option".
_LLAMA_STYLE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128)
_GEMMA_STYLE = dict(_LLAMA_STYLE, head_dim=8)
_MOE = dict(num_experts=4, num_experts_per_tok=2)


def _sliding_fields(window):
    return {} if window is None else dict(sliding_window=window)


def _qwen_sliding(window):
    # Layer 0 full, layer 1 sliding (max_window_layers counts the leading full-attention layers).
    return {} if window is None else dict(use_sliding_window=True, sliding_window=window, max_window_layers=1)


def _alternating(window):
    # Sliding then full attention, the per-layer mix of Gemma2/3 and Cohere2; the large default
    # window stands for "no window in reach" when none is asked for.
    return dict(sliding_window=window or 4096, layer_types=["sliding_attention", "full_attention"])


FAMILIES = {
    # name: (config class, model class, fields, fields for a window W or None when the family has none)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_STYLE, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_STYLE, _qwen_sliding),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _GEMMA_STYLE, _qwen_sliding),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_STYLE, sliding_window=None), _sliding_fields),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_LLAMA_STYLE, sliding_window=None, num_local_experts=4, num_experts_per_tok=2), _sliding_fields),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GEMMA_STYLE, None),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA_STYLE, query_pre_attn_scalar=8), _alternating),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_GEMMA_STYLE, query_pre_attn_scalar=8, final_logit_softcapping=30.0), _alternating),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_STYLE, sliding_window=None), _sliding_fields),
    "phi": ("PhiConfig", "PhiForCausalLM", _LLAMA_STYLE, None),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=None, n_head=4, n_positions=128), None),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _LLAMA_STYLE, None),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                                 max_position_embeddings=128, word_embed_proj_dim=32), None),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_attention_heads=4, alibi=False), None),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _LLAMA_STYLE, None),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_STYLE, None),
    # Untied: with Cohere's tied embeddings a random model only repeats its last token.
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_STYLE, tie_word_embeddings=False), None),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_LLAMA_STYLE, tie_word_embeddings=False), _alternating),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_LLAMA_STYLE, logits_scaling=4.0), None),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_LLAMA_STYLE, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       decoder_sparse_step=1, **_MOE), _qwen_sliding),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_LLAMA_STYLE, **_MOE), None),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(_LLAMA_STYLE, sliding_window=None, num_local_experts=4, num_experts_per_tok=2), _sliding_fields),
    # Refused by tree_speculative (ALiBi: positions come from a 2D mask; Mamba: a recurrent state);
    # srgen runs them.
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=32, state_size=8), None),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_head=4), None),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_attention_heads=4, alibi=True),
                     None),
}


def family_available(name):
    """None if this transformers has the family, else the reason it does not."""
    config_class, model_class = FAMILIES[name][:2]
    missing = [c for c in (config_class, model_class) if not hasattr(transformers, c)]
    return f"transformers {transformers.__version__} has no {', '.join(missing)}" if missing else None


def family_model(name, seed=0, window=None, layers=2):
    """A tiny random model of the family ``name`` (vocabulary 96, width 32, ``layers`` layers, float32,
    eval mode), with a sliding window of ``window`` tokens where given."""
    config_class, model_class, fields, window_fields = FAMILIES[name]
    fields = dict(fields)
    if window is not None:
        if window_fields is None:
            raise ValueError(f"{name} has no sliding window")
        fields.update(window_fields(window))
    elif window_fields is not None:
        fields.update(window_fields(None) if window_fields is _alternating else {})
    if "layer_types" in fields:
        fields["layer_types"] = fields["layer_types"][:layers] + ["full_attention"] * (layers - 2)
    if "n_layer" in fields:
        fields["n_layer"] = layers
    else:
        fields["num_hidden_layers"] = layers
    config = getattr(transformers, config_class)(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS,
                                                 eos_token_id=EOS, **fields)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()
