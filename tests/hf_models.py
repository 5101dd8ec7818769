"""Tiny random Hugging Face causal LMs and prompts for the fusedecode.hf tests (no hub access).

Import only from test modules that already did ``pytest.importorskip("transformers")``.
"""

import torch
import transformers

VOCAB = 96


def tiny_model(kind="llama", seed=0, layers=2):
    """A 2-layer (by default) Llama- or Qwen2-style model, width 32, vocabulary 96, fixed seed."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2,
                  pad_token_id=0, bos_token_id=1)
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
