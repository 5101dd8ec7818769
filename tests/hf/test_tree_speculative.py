"""fusedecode.hf.tree_speculative (the package fusedecode.hf.speculative): greedy identity with plain
generate, sampling distribution, caches."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import TreeConfig, bundled_model_path, tree_speculative  # noqa: E402
from fusedecode.hf.speculative.config import next_alpha  # noqa: E402
from fusedecode.hf.speculative.draft_tree import branch_depth  # noqa: E402
from fusedecode.hf.speculative.slot_cache import SlotCache  # noqa: E402
from hf_models import VOCAB, prompts, tiny_model  # noqa: E402


def sharpened(model, factor=6.0):
    """Scale lm_head so the random model has peaked distributions (drafts then get accepted)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


CONFIGS = [TreeConfig(max_depth=4, top_k=1, max_nodes=4, alpha=0.0),
           TreeConfig(max_depth=5, top_k=3, max_nodes=12),
           TreeConfig(max_depth=8, top_k=2, max_nodes=6, adaptive=False, alpha=0.0)]


def speculate(model, inputs, draft, config, **kwargs):
    return model.generate(**inputs, custom_generate=tree_speculative, draft_model=draft, tree_config=config,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("draft_kind", ["same", "random", "one_layer"])
def test_greedy_identical_to_plain_generate(kind, draft_kind):
    target = sharpened(tiny_model(kind, seed=0))
    draft = {"same": target, "random": sharpened(tiny_model(kind, seed=7)),
             "one_layer": sharpened(tiny_model(kind, seed=0, layers=1))}[draft_kind]
    for batch in (1, 3):
        inputs = prompts(batch, 7, seed=batch, padded_rows=batch - 1)
        plain = target.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
        for config in CONFIGS:
            out = speculate(target, inputs, draft, config, max_new_tokens=16, do_sample=False,
                            return_dict_in_generate=True)
            assert torch.equal(out.sequences, plain), (batch, config)
            assert out.num_accepted.shape[1] == batch
            if draft_kind == "same":  # the draft predicts the target exactly: deep acceptance
                assert out.mean_accepted_length > 1.5


def test_greedy_with_id_dependent_processors_and_stopping():
    """Repetition penalty, n-gram blocking, min length and a stop token see each node's own path."""
    target = sharpened(tiny_model("llama", seed=1), 4.0)
    draft = sharpened(tiny_model("llama", seed=2, layers=1), 4.0)
    inputs = prompts(2, 6, seed=5)
    stop_token = int(target.generate(**prompts(1, 6, seed=5, padded_rows=0), max_new_tokens=12,
                                     do_sample=False, pad_token_id=0)[0, 12])

    class StopOn(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    kwargs = dict(max_new_tokens=30, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2,
                  min_new_tokens=4, stopping_criteria=transformers.StoppingCriteriaList([StopOn()]))
    plain = target.generate(**inputs, pad_token_id=0, **kwargs)
    out = speculate(target, inputs, draft, TreeConfig(max_depth=5, top_k=2, max_nodes=10), **kwargs)
    assert torch.equal(out, plain)


def test_eos_and_max_new_tokens():
    target = sharpened(tiny_model("qwen2", seed=3))
    inputs = prompts(3, 5, seed=9)
    plain = target.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=0)
    eos = int(plain[1, 5 + 6])  # make a token row 1 emits early act as EOS
    plain = target.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=eos)
    out = speculate(target, inputs, target, TreeConfig(max_depth=6, top_k=2), max_new_tokens=40,
                    do_sample=False, eos_token_id=eos)
    assert torch.equal(out, plain)
    assert (out[1, 5 + 7:] == 0).all()  # padded after EOS
    short = speculate(target, inputs, target, TreeConfig(max_depth=6, top_k=2), max_new_tokens=3, do_sample=False)
    assert short.shape[1] == 5 + 3


def test_cache_keeps_exactly_the_accepted_path():
    """After a tree forward and keeping one branch, the next token's logits equal a plain forward."""
    model = tiny_model("llama", seed=4)
    prompt = torch.tensor([[5, 9, 13, 17, 21]])
    cache = SlotCache(model, 1, prompt.device)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None]
    cache.forward(prompt[:, :4], torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None], causal)
    # tree: root 21 (node 0), children 30 (1) and 31 (2), grandchild 40 under 31 (3)
    parents = torch.tensor([[-1, 0, 0, 2]])
    tokens = torch.tensor([[21, 30, 31, 40]])
    positions = torch.tensor([[4, 5, 5, 6]])
    from fusedecode.tree import tree_attention_mask
    cache.forward(tokens, torch.ones(1, 4, dtype=torch.bool), positions, tree_attention_mask(parents))
    keep = torch.tensor([[True] * 4 + [True, False, True, True]])
    cache.keep(keep)
    assert cache.length == 7
    logits = cache.forward(torch.tensor([[50]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[7]]),
                           torch.ones(1, 1, 1, dtype=torch.bool))
    with torch.no_grad():
        expected = model(torch.tensor([[5, 9, 13, 17, 21, 31, 40, 50]])).logits[:, -1].float()
    torch.testing.assert_close(logits[:, -1], expected, rtol=1e-4, atol=1e-4)


def _chi_square_p_value(counts, probabilities):
    """Upper tail of Pearson's statistic (Wilson-Hilferty normal approximation), merged sparse bins."""
    expected = probabilities * counts.sum()
    order = torch.argsort(expected, descending=True)
    observed, wanted, tail_observed, tail_wanted = [], [], 0.0, 0.0
    for index in order.tolist():
        if expected[index] >= 5:
            observed.append(float(counts[index]))
            wanted.append(float(expected[index]))
        else:
            tail_observed += float(counts[index])
            tail_wanted += float(expected[index])
    if tail_wanted > 0:
        observed.append(tail_observed)
        wanted.append(tail_wanted)
    statistic = sum((o - w) ** 2 / w for o, w in zip(observed, wanted))
    dof = len(wanted) - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("sampling", ["target_only", "multi_draft"])
def test_sampled_tokens_follow_the_target_distribution(sampling):
    target = sharpened(tiny_model("llama", seed=5), 15.0)
    draft = sharpened(tiny_model("llama", seed=5), 15.0)
    with torch.no_grad():  # related but different: a perturbed copy of the target
        for weight in draft.parameters():
            weight.add_(0.3 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    temperature, samples = 0.8, 3000
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        first = torch.softmax(target(prompt).logits[0, -1] / temperature, -1)
    mode = int(first.argmax())
    with torch.no_grad():
        second = torch.softmax(target(torch.cat([prompt, torch.tensor([[mode]])], 1)).logits[0, -1] / temperature, -1)
    torch.manual_seed(11)
    config = TreeConfig(max_depth=3, top_k=3, max_nodes=9, sampling=sampling, alpha=0.0)
    out = speculate(target, dict(input_ids=prompt.repeat(samples, 1)), draft, config, max_new_tokens=2,
                    do_sample=True, temperature=temperature, top_k=0, return_dict_in_generate=True)
    assert out.mean_accepted_length > 1.2  # the draft's tokens were accepted, so the walk was exercised
    tokens = out.sequences[:, 5:]
    first_counts = torch.bincount(tokens[:, 0], minlength=VOCAB)
    assert _chi_square_p_value(first_counts, first) > 1e-3
    after_mode = tokens[tokens[:, 0] == mode, 1]
    assert after_mode.numel() > 300
    assert _chi_square_p_value(torch.bincount(after_mode, minlength=VOCAB), second) > 1e-3


def test_return_dict_and_streamer():
    target = sharpened(tiny_model("llama", seed=6))

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    inputs = prompts(1, 6, padded_rows=0)
    out = speculate(target, inputs, target, TreeConfig(max_depth=4, top_k=2), max_new_tokens=15, do_sample=False,
                    token_streamer=streamer, return_dict_in_generate=True)
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]  # chunk 0 is the prompt
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist()
    assert streamed == out.sequences[0, 6:].tolist() and streamer.ended
    steps = out.num_accepted.shape[0]
    assert out.num_accepted.shape == (steps, 1)
    assert out.mean_accepted_length == pytest.approx(15 / steps)
    assert out.past_key_values is None


def test_bundled_models_greedy_identity():
    from fusedecode.demo import arithmetic
    from fusedecode.demo.demo import load

    target, tokenizer = load(bundled_model_path("target"))
    draft, _ = load(bundled_model_path("draft"))
    texts = [arithmetic.prompt_text(a, b) for a, b in arithmetic.evaluation_problems(4)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = target.generate(**enc, **kwargs)
    out = target.generate(**enc, custom_generate=tree_speculative, draft_model=draft,
                          tree_config=TreeConfig(max_depth=12, top_k=2, max_nodes=24),
                          return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert out.mean_accepted_length > 6  # the bundled draft: 10.25 tokens per target forward at depth 12


def test_unsupported_generate_arguments_raise_naming_them():
    target = tiny_model("llama")
    inputs = prompts(2, 4)
    with pytest.raises(ValueError, match="draft_model"):
        target.generate(**inputs, custom_generate=tree_speculative, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(TypeError, match="tree_config"):
        speculate(target, inputs, target, {"max_depth": 3}, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        speculate(target, inputs, target, TreeConfig(), max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="output_scores"):
        speculate(target, inputs, target, TreeConfig(), max_new_tokens=2, output_scores=True,
                  return_dict_in_generate=True)
    with pytest.raises(ValueError, match="batch of 1"):
        speculate(target, inputs, target, TreeConfig(), max_new_tokens=2,
                  token_streamer=transformers.generation.BaseStreamer())
    with pytest.raises(ValueError, match="same device"):
        speculate(target, inputs, tiny_model("llama").to("meta"), TreeConfig(), max_new_tokens=2)
    for bad in (dict(max_depth=0), dict(top_k=1.5), dict(max_nodes=True), dict(alpha=1.5), dict(alpha="x"),
                dict(sampling="greedy"), dict(adaptive=1)):
        with pytest.raises(ValueError, match="TreeConfig"):
            TreeConfig(**bad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_and_sampling(dtype):
    target = sharpened(tiny_model("llama", seed=0)).to("cuda", dtype)
    draft = sharpened(tiny_model("llama", seed=0, layers=1)).to("cuda", dtype)
    inputs = {name: value.cuda() for name, value in prompts(3, 7, padded_rows=2).items()}
    config = TreeConfig(max_depth=5, top_k=2, max_nodes=10)
    plain = target.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out = speculate(target, inputs, draft, config, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, plain)
    else:  # bf16: a batched tree forward may round differently from one-token forwards near ties
        assert out.sequences.shape[0] == 3 and bool((out.sequences < VOCAB).all())
    for sampling in ("target_only", "multi_draft"):
        sampled = speculate(target, inputs, draft, TreeConfig(max_depth=5, top_k=2, max_nodes=10, sampling=sampling),
                            max_new_tokens=8, do_sample=True, temperature=0.8)
        assert sampled.device.type == "cuda" and sampled.shape[1] <= 7 + 8


def test_draft_with_a_smaller_vocabulary():
    """Ids the draft's embedding lacks reach it as 0 (Qwen-style padded vocabularies differ in size)."""
    target = sharpened(tiny_model("llama", seed=0))
    torch.manual_seed(1)
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    inputs = dict(input_ids=torch.tensor([[5, 9, 80, 13]]))
    plain = target.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert (plain[0, 4:] >= 64).any()  # the target does emit ids the draft lacks
    out = speculate(target, inputs, draft, TreeConfig(max_depth=4, top_k=2), max_new_tokens=20, do_sample=False)
    assert torch.equal(out, plain)


def test_logits_only_where_needed():
    """Per step: the draft's logits at each row's root (1 position), then at each fed frontier
    (top_k per level), and the target's at the tree's nodes; nothing else (no prompt logits)."""
    model = tiny_model("llama", seed=1)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    config = TreeConfig(max_depth=3, top_k=2, max_nodes=5, alpha=0.0, adaptive=False)
    out = speculate(model, prompts(2, 30, seed=2), model, config, max_new_tokens=9, do_sample=False,
                    return_dict_in_generate=True)
    handle.remove()
    vocab = model.config.vocab_size
    steps = out.num_accepted.shape[0]
    # Depth 1: the root's 2 children, both fed (one draft forward of 2); depth 2: 4 nodes, the best 2
    # fed; depth 3 = max_depth: 4 more, not fed. The 10 drafted nodes are pruned to 5: the target
    # scores 6 rows (the prompt and the pending tokens give no logits).
    per_step = [(2, 1, vocab), (2, 2, vocab), (2, 2, vocab), (2, 6, vocab)]
    assert shapes == per_step * steps, shapes


def test_alpha_follows_the_branch_the_walk_stopped_in():
    parents, depths = [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3]  # 0 -> 1 -> 3 -> 4, and 0 -> 2 (a leaf)
    assert branch_depth(parents, depths, 2) == 1  # reached a leaf: the whole branch was accepted
    assert branch_depth(parents, depths, 1) == 3
    assert branch_depth(parents, depths, 0) == 3
    alpha, config = 0.4, TreeConfig(min_alpha=0.01)
    alpha = next_alpha(alpha, 1, branch_depth(parents, depths, 2), config)
    assert alpha == 0.2  # halved
    alpha = next_alpha(alpha, 1, branch_depth(parents, depths, 1), config)
    assert alpha == pytest.approx(2 / 3)  # the rejected fraction of a depth-3 branch


def test_history_keeping_processor_is_refused():
    from fusedecode.hf import UncertaintyProcessor

    target = tiny_model("llama")
    with pytest.raises(ValueError, match="UncertaintyProcessor"):
        speculate(target, prompts(1, 4), target, TreeConfig(), max_new_tokens=2,
                  logits_processor=transformers.LogitsProcessorList([UncertaintyProcessor()]))


def test_pads_with_eos_when_there_is_no_pad_token():
    target = sharpened(tiny_model("qwen2", seed=3))
    inputs = dict(input_ids=prompts(3, 5, seed=9, padded_rows=0)["input_ids"])
    first = target.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=0)
    eos = int(first[1, 5 + 6])
    target.generation_config.pad_token_id = None
    plain = target.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    out = target.generate(**inputs, custom_generate=tree_speculative, draft_model=target, max_new_tokens=40,
                          do_sample=False, eos_token_id=eos, tree_config=TreeConfig(max_depth=6, top_k=2))
    assert torch.equal(out, plain)
    assert (out[1, 5 + 7:] == eos).all()


def test_prefix_constrained_processor_sees_each_rows_batch_id():
    """prefix_allowed_tokens_fn is called with the batch id of the row each tree node belongs to."""
    target = sharpened(tiny_model("llama", seed=1), 4.0)
    draft = sharpened(tiny_model("llama", seed=2, layers=1), 4.0)
    allowed = [list(range(3, 50)), list(range(50, VOCAB))]
    kwargs = dict(max_new_tokens=12, do_sample=False, prefix_allowed_tokens_fn=lambda batch_id, ids: allowed[batch_id])
    inputs = prompts(2, 6, seed=5)
    plain = target.generate(**inputs, pad_token_id=0, **kwargs)
    assert all(set(plain[row, 6:].tolist()) <= set(allowed[row]) for row in range(2))
    out = speculate(target, inputs, draft, TreeConfig(max_depth=4, top_k=3, max_nodes=10), **kwargs)
    assert torch.equal(out, plain)


def test_cache_is_passed_by_the_forwards_own_keyword():
    """transformers 5.2x renamed past_key_values to cache (the old name goes in 5.40): no deprecation."""
    import warnings

    target = tiny_model("llama", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        speculate(target, prompts(2, 6), target, TreeConfig(max_depth=3, top_k=2), max_new_tokens=6, do_sample=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
