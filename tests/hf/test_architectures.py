"""The architecture matrix: fusedecode.hf on tiny random models of many decoder families.

Per family, and again with a sliding window of 4 tokens where the family has one (prompts of 10,
16 new tokens, so the window is in reach): the UncertaintyProcessor changes nothing and records
output_scores' statistics; tree_speculative's greedy output is plain generate's with two drafts
(the target itself and another random model of the family) at batch 1 and at batch 2 with left
padding; tree sampling runs in both modes; srgen without a trigger is plain generate (greedy and
sampled with one seed) and feeds the model what plain generate feeds it; srgen's corrected logits are
the model's own head (its transform included) applied to the hidden state plus delta. What cannot
run is refused with a ValueError before any forward.

The per-family facts these tests exercise (logit transforms, sliding windows, ALiBi and recurrent
refusals, cache keywords) are the architecture table, python/fusedecode/hf/models/architectures.py;
the families are tests/hf/hf_models.py's ``FAMILIES``. Every logit transform rule of the table has a
family here whose own logits are checked against the head fusedecode reads (``HEAD_FAMILIES`` for
the rules the matrix does not reach).
"""

import functools
import inspect
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import SRGenConfig, TreeConfig, UncertaintyProcessor, srgen, tree_speculative  # noqa: E402
from fusedecode.hf.models.architectures import LOGIT_TRANSFORMS  # noqa: E402
from fusedecode.hf.models.head import corrected_logits, read_output_head  # noqa: E402
from fusedecode.hf.models.hidden import FinalHiddenCapture  # noqa: E402
from fusedecode.reference import logit_stats_reference  # noqa: E402
from hf_models import FAMILIES, PAD, VOCAB, family_available, family_model, prompts  # noqa: E402

PROMPT, NEW, WINDOW = 10, 16, 4
TREE = TreeConfig(max_depth=4, top_k=2, max_nodes=8)
NEVER = SRGenConfig(min_threshold=math.inf, warmup_threshold=math.inf)
# Entropies are below log(96) < 5 nats, so mean - 100 * max(std, 1) is always below them.
ALWAYS = dict(k=-100.0, min_std=1.0, min_threshold=-1.0, warmup_threshold=-1.0)

# Refused by tree_speculative, with the reason its ValueError names; srgen runs them.
TREE_REFUSED = {"bloom": "ALiBi", "falcon_alibi": "ALiBi", "mamba": "recurrent state"}


def _cases(families):
    cases = []
    for name in families:
        cases.append(pytest.param((name, None), id=name))
        if FAMILIES[name][3] is not None:
            cases.append(pytest.param((name, WINDOW), id=f"{name}-window{WINDOW}"))
    return cases


ALL_CASES = _cases(FAMILIES)
TREE_CASES = _cases([name for name in FAMILIES if name not in TREE_REFUSED])
SRGEN_CASES = ALL_CASES
WINDOWED = [name for name in FAMILIES if FAMILIES[name][3] is not None]


# Tiny models: one thread (tests/hf/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _built(name, window, seed):
    model = family_model(name, seed=seed, window=window)
    with torch.no_grad():  # peaked distributions, so that drafts get accepted and ties are rare
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def model_of(case, seed=0):
    name, window = case
    reason = family_available(name)
    if reason is not None:
        pytest.skip(reason)
    return _built(name, window, seed)


def exact_cache(case):
    """``generate`` keywords for a cache that keeps every key. transformers 4.5x gives its old-style
    sliding-window models (Qwen2-MoE, PhiMoE) a cache that drops the keys past the window while their
    4D mask still counts them, so their own cached generate attends uniformly within the window past
    it (logits ~1e-3 off a forward without cache); with a full DynamicCache they are exact."""
    name, window = case
    if window is None or name not in ("qwen2_moe", "phimoe") or int(transformers.__version__.split(".")[0]) >= 5:
        return {}
    return {"past_key_values": transformers.DynamicCache()}


def speculate(target, inputs, draft, config=TREE, **kwargs):
    return target.generate(**inputs, custom_generate=tree_speculative, draft_model=draft, tree_config=config,
                           max_new_tokens=NEW, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("case", ALL_CASES)
def test_uncertainty_processor_changes_nothing(case):
    model = model_of(case)
    inputs = prompts(2, PROMPT, seed=1)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
                  output_scores=True)
    plain = model.generate(**inputs, **kwargs)
    processor = UncertaintyProcessor(topk=5)
    watched = model.generate(**inputs, logits_processor=[processor], **kwargs)
    assert torch.equal(plain.sequences, watched.sequences)
    assert processor.entropy.shape == (2, len(watched.scores))
    for step, scores in enumerate(watched.scores):
        expected = logit_stats_reference(scores, topk=5, dtype=torch.float64)
        for field in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "topk_confidence"):
            got, want = getattr(processor, field)[:, step].double(), getattr(expected, field)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (field, step, got, want)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", TREE_CASES)
def test_tree_greedy_is_plain_generate(case, batch):
    target, other = model_of(case), model_of(case, seed=7)
    inputs = prompts(batch, PROMPT, seed=batch, padded_rows=batch - 1)
    plain = target.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **exact_cache(case))
    for draft in (target, other):
        out = speculate(target, inputs, draft, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain), ("self" if draft is target else "other", out.sequences, plain)
        if draft is target:  # the draft predicts the target exactly: the tree is accepted deep
            assert out.mean_accepted_length > 1.5


@pytest.mark.parametrize("case", TREE_CASES)
def test_tree_sampling_runs(case):
    target, other = model_of(case), model_of(case, seed=7)
    inputs = prompts(2, PROMPT, seed=2)
    for sampling in ("target_only", "multi_draft"):
        torch.manual_seed(0)
        out = speculate(target, inputs, other, TreeConfig(max_depth=4, top_k=2, max_nodes=8, sampling=sampling),
                        do_sample=True, temperature=0.8)
        assert out.shape[0] == 2 and PROMPT < out.shape[1] <= PROMPT + NEW
        assert torch.equal(out[:, :PROMPT], inputs["input_ids"])
        assert bool(((out >= 0) & (out < VOCAB)).all())


@pytest.mark.parametrize("name", WINDOWED)
def test_the_window_is_in_reach(name):
    """The windowed cases above test something: on the prompts of the greedy identity test, the
    window changes the tokens plain generate emits (same weights, same prompts)."""
    windowed, full = model_of((name, WINDOW)), model_of((name, None))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    for batch in (1, 2):
        inputs = prompts(batch, PROMPT, seed=batch, padded_rows=batch - 1)
        assert not torch.equal(windowed.generate(**inputs, **kwargs), full.generate(**inputs, **kwargs)), batch


@pytest.mark.parametrize("name", sorted(TREE_REFUSED))
def test_tree_refuses_before_any_forward(name):
    refused, llama = model_of((name, None)), model_of(("llama", None))
    forwards = []
    hooks = [model.register_forward_pre_hook(lambda *args: forwards.append(1)) for model in (refused, llama)]
    try:
        with pytest.raises(ValueError, match=f"target model.*{TREE_REFUSED[name]}|{TREE_REFUSED[name]}.*target model"):
            speculate(refused, prompts(2, PROMPT), llama, do_sample=False)
        with pytest.raises(ValueError, match=f"draft_model.*{TREE_REFUSED[name]}|{TREE_REFUSED[name]}.*draft_model"):
            speculate(llama, prompts(2, PROMPT), refused, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert not forwards


def test_tree_refuses_mixed_layers_its_decoder_cannot_tell_apart():
    """A config that mixes layer types, on a decoder that takes one mask for all layers (Llama):
    tree_speculative cannot give each layer its own mask."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="mixes full and sliding-window layers"):
        speculate(model, prompts(1, PROMPT), model, do_sample=False)


def test_tree_refuses_attention_that_ignores_a_4d_mask_and_chunked_attention():
    model = family_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # reads padding only, never the tree mask
    with pytest.raises(ValueError, match="flash_attention_2.*attn_implementation='sdpa'"):
        speculate(model, prompts(1, PROMPT), model_of(("llama", None)), do_sample=False)
    chunked = family_model("llama")
    chunked.config.attention_chunk_size = 8
    with pytest.raises(ValueError, match="chunked attention"):
        speculate(model_of(("llama", None)), prompts(1, PROMPT), chunked, do_sample=False)


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("case", SRGEN_CASES)
def test_srgen_without_trigger_is_plain_generate(case, sampling):
    """Same tokens, logits and scores as plain generate, and the model is fed the same shapes: the
    prompt once, then one token per step (not the whole sequence again on top of the cache)."""
    model = model_of(case)
    inputs = prompts(2, PROMPT, seed=3)
    kwargs = dict(max_new_tokens=NEW, do_sample=sampling, pad_token_id=PAD, return_dict_in_generate=True,
                  output_logits=True, output_scores=True)
    if sampling:
        kwargs.update(temperature=0.8, top_k=20)
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, output: fed.append(args[0].shape))
    try:
        torch.manual_seed(5)
        plain = model.generate(**inputs, **kwargs)
        plain_fed = list(fed)
        fed.clear()
        torch.manual_seed(5)
        out = model.generate(**inputs, custom_generate=srgen, srgen_config=NEVER, **kwargs)
    finally:
        hook.remove()
    assert fed == plain_fed
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits))
    assert all(torch.equal(a, b) for a, b in zip(out.scores, plain.scores))
    assert out.corrections == [[], []]


def _logits_with_delta(model, input_ids, attention_mask, delta):
    """The model's own logits with ``delta`` added to what its lm_head reads (the final hidden state)."""
    def add_delta(module, args):
        return (args[0] + delta.to(args[0].dtype),) + args[1:]

    # Positions as generate gives them (GPT-2 would count the left padding otherwise).
    positions = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)} \
        if "position_ids" in inspect.signature(model.forward).parameters else {}
    hook = model.get_output_embeddings().register_forward_pre_hook(add_delta)
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, **positions).logits[0].float()
    finally:
        hook.remove()


def _reference_correction(model, input_ids, attention_mask, config, temperature=1.0):
    """SRGen's correction with full logits through the model's whole head: AdamW on
    ``(1 - w) * CE(context) + w * entropy(last position)``; returns the corrected last logits."""
    targets = input_ids[0, 1:]
    counted = attention_mask[0, 1:].bool() & attention_mask[0, :-1].bool()
    delta = torch.zeros(model.get_output_embeddings().weight.shape[1], requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=1e-8, eps=1e-5)
    for _ in range(config.steps):
        logits = _logits_with_delta(model, input_ids, attention_mask, delta)
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        cross_entropy = -log_probs[counted].gather(1, targets[counted][:, None]).mean()
        last = torch.log_softmax(logits[-1] / temperature, dim=-1)
        entropy = -(last.exp() * last).sum()
        loss = (1 - config.entropy_weight) * cross_entropy + config.entropy_weight * entropy
        (delta.grad,) = torch.autograd.grad(loss, delta)
        optimizer.step()
    with torch.no_grad():
        return _logits_with_delta(model, input_ids, attention_mask, delta)[-1]


@pytest.mark.parametrize("case", SRGEN_CASES)
def test_srgen_corrections_use_the_models_own_head(case):
    model = model_of(case)
    inputs = prompts(2, PROMPT, seed=4)
    config = SRGenConfig(max_corrections=2, steps=2, lr=0.05, entropy_weight=0.3, **ALWAYS)
    out = model.generate(**inputs, custom_generate=srgen, srgen_config=config, max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
                         **exact_cache(case))
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    checked = 0
    for row, corrections in enumerate(out.corrections):
        for step, _, _ in corrections:
            current = PROMPT + step - 1  # the position whose logits chose the token of this step
            expected = _reference_correction(model, out.sequences[row:row + 1, :current + 1],
                                             mask[row:row + 1, :current + 1], config)
            got = out.logits[step][row]
            assert torch.allclose(got, expected, rtol=1e-4, atol=3e-4), (row, step, (got - expected).abs().max())
            checked += 1
    assert checked == 2 * config.max_corrections


def test_srgen_refuses_a_filled_cache():
    """Under whichever name this transformers keeps the cache (``cache`` since 5.2x)."""
    model = model_of(("llama", None))
    inputs = prompts(1, PROMPT, padded_rows=0)
    cache = transformers.DynamicCache()
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(**inputs, use_cache=True, **{keyword: cache})
    assert cache.get_seq_length() == PROMPT
    with pytest.raises(ValueError, match="filled"):
        model.generate(**inputs, max_new_tokens=3, custom_generate=srgen, pad_token_id=PAD, **{keyword: cache})


# ---- The head's logit transforms: every rule of the architecture table against a model's own logits ----
# Families whose logit transform rule the matrix above does not reach (their generate paths are not
# the point): name -> (config class, model class, config fields). Their tiny models' own logits are
# compared with the head read by fusedecode.hf.models.head.
_HEAD_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=128)
HEAD_FAMILIES = {
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(_HEAD_COMMON, lru_width=32, attention_window_size=8,
                             block_types=["recurrent", "attention"], logits_soft_cap=3.0)),
    # MiniCPM3's logits_scaling is hidden_size / dim_model_base: 4 here.
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM",
                 dict(_HEAD_COMMON, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      head_dim=8, v_head_dim=8, dim_model_base=8)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(_HEAD_COMMON, logits_scaling=4.0)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(_HEAD_COMMON, num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(_HEAD_COMMON, head_dim=8,
                                                                     final_logit_softcapping=3.0)),
}


@functools.lru_cache(maxsize=None)
def _head_family_model(name):
    config_class, model_class, fields = HEAD_FAMILIES[name]
    if not hasattr(transformers, config_class) or not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    config = getattr(transformers, config_class)(vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=PAD,
                                                 eos_token_id=2, bos_token_id=1, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # logits well beyond the soft-cap, so that a missing cap shows
        model.get_output_embeddings().weight.mul_(4.0)
    return model


@pytest.mark.parametrize("name", sorted(HEAD_FAMILIES))
def test_head_reconstruction_is_the_models_own_logits(name):
    model = _head_family_model(name)
    inputs = prompts(2, PROMPT, seed=6, padded_rows=0)
    with torch.no_grad(), FinalHiddenCapture(model) as capture:
        logits = model(**inputs).logits.float()
        hidden = capture.take()
    head = read_output_head(model)
    assert head.transform.logit_scale is not None or head.transform.softcap is not None, head.describe()
    rebuilt = corrected_logits(hidden, None, head)
    assert torch.allclose(rebuilt, logits, rtol=1e-5, atol=1e-5), (head.describe(), (rebuilt - logits).abs().max())


def test_every_logit_transform_rule_has_a_family():
    """Each rule of the architecture table's LOGIT_TRANSFORMS applies to some family tested here
    (the matrix's, whose srgen corrections are checked against the model's own head, or
    HEAD_FAMILIES'), with the rule's config field set."""
    configs = [model_of((name, None)).config for name in FAMILIES if family_available(name) is None]
    configs += [_head_family_model(name).config for name in HEAD_FAMILIES]
    for rule in LOGIT_TRANSFORMS:
        covered = [config.model_type for config in configs if rule.applies_to(config.model_type)
                   and getattr(config, rule.field, None) is not None]
        assert covered, rule
