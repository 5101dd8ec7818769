"""tree_speculative's sampled output has the target's distribution, end to end through generate,
with the power to see a 2% total-variation error in the first two tokens (tests/support/distribution.py).

Target and draft are bigram models (one Llama layer whose attention and MLP write nothing, so the
logits depend on the last token only) over four outcome tokens with known distributions: the
draft proposes the target's distribution reversed, so a wrong residual, a draft distribution taken
from the wrong tree level or node, or a second token drawn from the wrong row moves the output
far more than 2%.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from support.distribution import assert_distributed_as, assert_powerful, required_draws  # noqa: E402
from fusedecode.hf import TreeConfig, tree_speculative  # noqa: E402

VOCAB = 8  # 0 pad, 1 bos, 2 eos, 3 a prompt token; 4..7 the outcomes
OUTCOMES = 4
FIRST_OUTCOME = 4
TARGET = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
DRAWS = 36_000  # >= required_draws(16): 16 cells for the pair of the first two tokens


def bigram_model(first_row):
    """A Llama whose logits after token x are log(first_row rolled by x - 3) on the outcomes (any
    other token: impossible), so the token after the prompt's last token 4 follows ``first_row``."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    table = torch.full((VOCAB, VOCAB), -1e4)  # table[x, v]: logit of v after x
    for x in range(VOCAB):
        table[x, FIRST_OUTCOME:] = first_row.roll(x - FIRST_OUTCOME).log().float()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        # The final RMSNorm scales a one-hot by sqrt(VOCAB); the head undoes it.
        model.lm_head.weight.copy_(table.T / VOCAB ** 0.5)
    return model


def next_distribution(model, ids):
    """The model's distribution over the outcomes after ``ids`` (exactly what it samples from)."""
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    assert float(probs[:FIRST_OUTCOME].sum()) == 0
    return probs[FIRST_OUTCOME:]


@pytest.mark.parametrize("sampling", ["target_only", "multi_draft"])
def test_first_two_tokens_follow_the_target(sampling):
    target, draft = bigram_model(TARGET), bigram_model(TARGET.flip(0))
    prompt = [3, 4]
    first = next_distribution(target, prompt)
    assert torch.allclose(first, TARGET, atol=1e-6)  # the model is the bigram table
    pairs = torch.stack([first[a] * next_distribution(target, prompt + [FIRST_OUTCOME + a])
                         for a in range(OUTCOMES)]).reshape(-1)
    assert DRAWS >= required_draws(16)
    assert_powerful(pairs, DRAWS)
    torch.manual_seed(20261201)
    config = TreeConfig(max_depth=2, top_k=2, max_nodes=6, alpha=0.0, sampling=sampling)
    out = target.generate(input_ids=torch.tensor([prompt]).repeat(DRAWS, 1), attention_mask=None,
                          custom_generate=tree_speculative, draft_model=draft, tree_config=config, max_new_tokens=2,
                          do_sample=True, temperature=1.0, top_k=0, pad_token_id=0, return_dict_in_generate=True)
    tokens = out.sequences[:, len(prompt):] - FIRST_OUTCOME
    assert tokens.shape == (DRAWS, 2) and bool(((tokens >= 0) & (tokens < OUTCOMES)).all())
    assert_distributed_as(tokens[:, 0], first, f"first token [{sampling}]")
    assert_distributed_as(tokens[:, 0] * OUTCOMES + tokens[:, 1], pairs, f"first two tokens [{sampling}]")
    # The trees were used: the first step accepted drafted tokens in a share of the rows (target-only:
    # the draft's top 2 are the target's two least likely tokens, p = .2; multi-draft ~ .6).
    assert float((out.num_accepted[0] > 0).double().mean()) > 0.1
