"""fusedecode.hf.score: teacher-forced statistics of given sequences, against the model's own
materialised logits and against what UncertaintyProcessor records during generate."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode import logit_stats  # noqa: E402
from fusedecode.hf import UncertaintyProcessor, score  # noqa: E402
from helpers import assert_close_to_reference  # noqa: E402
from hf_models import EOS, PAD, VOCAB, family_available, family_model, prompts, tiny_model  # noqa: E402

FIELDS = ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "topk_confidence")


def head_model(kind):
    """Tiny models whose head transforms its logits strongly enough that leaving the transform out
    changes every statistic: a Gemma2-like soft-cap of 0.5, Cohere's logit_scale of 4, on logits
    made large (a random model's are ~0.01, where tanh is the identity)."""
    reason = family_available(kind)
    if reason:
        pytest.skip(reason)
    model = family_model(kind)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100.0)
    if kind == "gemma2":
        model.config.final_logit_softcapping = 0.5
    if kind == "cohere":
        model.config.logit_scale = model.logit_scale = 4.0  # the model reads the copy it took at init
    return model


def materialised(model, input_ids, attention_mask=None, temperature=1.0, topk=0):
    """What score replaces: the model's full ``[B, T, V]`` logits, then logit_stats of positions
    0..T-2 with the next tokens. Returns ``(logits [B, T-1, V], token_ids [B, T-1])``."""
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
    return logits[:, :-1], input_ids[:, 1:]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "cohere"])
def test_equals_logit_stats_of_the_models_logits(kind):
    model = tiny_model(kind) if kind in ("llama", "qwen2") else head_model(kind)
    input_ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    stats = score(model, input_ids, temperature=0.7, topk=5, max_tokens_per_chunk=3)
    logits, token_ids = materialised(model, input_ids)
    assert stats.entropy.shape == (2, 10)
    assert_close_to_reference(stats, logits, temperature=0.7, token_ids=token_ids, topk=5, context=kind)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_the_head_transform_matters(kind):
    """The check above can fail: the transform changes every row's statistics here."""
    model = head_model(kind)
    input_ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    plain = logit_stats(model.get_output_embeddings()(hidden)[:, :-1].float())
    assert not torch.allclose(score(model, input_ids).entropy, plain.entropy, rtol=1e-2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padding_left_and_right(kind):
    """A padded row scores as the same sequence alone at its real positions; entries whose token t or
    t + 1 is padding are NaN, argmax -1. GPT-2's learned absolute positions (unlike RoPE, which only
    sees differences) need the positions counted over real tokens, as generate does."""
    model = tiny_model("llama") if kind == "llama" else family_model(kind)
    sequence = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    alone = score(model, sequence, topk=3)
    pad = torch.full((1, 3), PAD)
    left = torch.cat([torch.cat([pad, sequence], 1), torch.randint(3, VOCAB, (1, 11))])
    right = torch.cat([torch.cat([sequence, pad], 1), torch.randint(3, VOCAB, (1, 11))])
    left_mask = torch.ones_like(left)
    left_mask[0, :3] = 0
    right_mask = torch.ones_like(right)
    right_mask[0, 8:] = 0
    for ids, mask, real in ((left, left_mask, slice(3, 10)), (right, right_mask, slice(0, 7))):
        stats = score(model, ids, mask, topk=3)
        assert stats.entropy.shape == (2, 10)
        for field in FIELDS + ("token_logprob",):
            torch.testing.assert_close(getattr(stats, field)[0, real], getattr(alone, field)[0], rtol=1e-4,
                                       atol=1e-5)
        padded = torch.ones(10, dtype=torch.bool)
        padded[real] = False
        assert torch.isnan(stats.entropy[0, padded]).all() and (stats.argmax[0, padded] == -1).all()
        assert torch.isnan(stats.token_logprob[0, padded]).all()
        assert not torch.isnan(stats.entropy[1]).any()


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_online_during_generate_equals_offline_score(kind):
    """UncertaintyProcessor's history during generate (left-padded batch, greedy) and score of the
    sequences generate returned give the same numbers for every generated token up to its EOS."""
    model = tiny_model(kind) if kind == "llama" else head_model(kind)
    inputs = prompts(3, 6, padded_rows=2)
    processor = UncertaintyProcessor(temperature=0.9, topk=4)
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                                   logits_processor=[processor])
    prompt_length, steps = inputs["input_ids"].shape[1], processor.num_steps
    generated = sequences.shape[1] - prompt_length
    mask = torch.cat([inputs["attention_mask"], torch.ones((3, generated), dtype=torch.long)], 1)
    offline = score(model, sequences, mask, temperature=0.9, topk=4)
    real = processor.token_mask(sequences, EOS)
    assert real.sum() >= 3 * 2
    positions = slice(prompt_length - 1, prompt_length - 1 + steps)
    for field in FIELDS:
        online_values, offline_values = getattr(processor, field)[real], getattr(offline, field)[:, positions][real]
        torch.testing.assert_close(offline_values, online_values, rtol=1e-4, atol=1e-4, msg=field)
    # Greedy: each generated token is the argmax, so its log-probability is the top one.
    generated_tokens = sequences[:, prompt_length:prompt_length + steps]
    assert torch.equal(offline.argmax[:, positions][real], generated_tokens[real])
    torch.testing.assert_close(offline.token_logprob[:, positions][real], offline.max_logprob[:, positions][real])


def test_no_full_logits_are_computed():
    """The forward computes the last position's logits only (where the model takes logits_to_keep)."""
    model = tiny_model("llama")
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    try:
        score(model, torch.randint(3, VOCAB, (2, 12)))
    finally:
        handle.remove()
    assert shapes == [torch.Size([2, 1, VOCAB])]


def test_one_token_gives_empty_statistics():
    stats = score(tiny_model("llama"), torch.tensor([[5], [6]]))
    assert stats.entropy.shape == (2, 0) and stats.token_logprob.shape == (2, 0)


def test_bad_arguments_raise_errors_naming_them():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    cases = [
        (dict(input_ids=ids.float()), TypeError, "input_ids"),
        (dict(input_ids=ids[0]), ValueError, "input_ids"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.full((2, 5), 2)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.ones(2, 5)), TypeError, "attention_mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=torch.ones(2)), TypeError, "temperature"),
        (dict(topk=65), ValueError, "topk"),
        (dict(max_tokens_per_chunk=0), ValueError, "max_tokens_per_chunk"),
    ]
    for override, error, name in cases:
        arguments = dict(input_ids=ids, attention_mask=None)
        arguments.update(override)
        with pytest.raises(error, match=name):
            score(model, arguments.pop("input_ids"), arguments.pop("attention_mask"), **arguments)
