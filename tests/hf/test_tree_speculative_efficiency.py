"""What identity tests cannot see in tree speculation: the pruning order and size, LLMCad's alpha
floor, and (with the target as its own draft) that every verification accepts the whole branch the
walk went down, which fails when the draft's cache loses a fed slot or the tree loses the draft's
best child."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import fusedecode.hf.speculative.step as step_module  # noqa: E402
from fusedecode.hf import TreeConfig, tree_speculative  # noqa: E402
from fusedecode.hf.speculative.config import next_alpha  # noqa: E402
from fusedecode.hf.speculative.draft_tree import DraftRow, DraftTree  # noqa: E402
from hf_models import prompts, tiny_model  # noqa: E402


def grown_tree():
    """Root 0; children 1, 2, 3; under 1: 4, 5; under 2: 6; under 4: 7. Log-probabilities are exact
    binary fractions so that the ties are exact: cumulative 1: -0.5; 2 and 4: -1 (2 is shallower);
    6: -1.25; 3, 5 and 7: -2 (by depth). Best first: 1, 2, 4, 6, 3, 5, 7."""
    tree = DraftTree(root_token=10, root_draft_row=DraftRow(0, 0))
    for token, parent, logprob in ((11, 0, -0.5), (12, 0, -1.0), (13, 0, -2.0), (14, 1, -0.5), (15, 1, -1.5),
                                   (16, 2, -0.25), (17, 4, -1.0)):
        tree.add(token, parent, logprob)
    return tree


@pytest.mark.parametrize("max_nodes,kept", [
    (1, [1]),
    (2, [1, 2]),  # 2 and 4 tie: 2 is shallower
    (3, [1, 2, 4]),
    (4, [1, 2, 4, 6]),
    (5, [1, 2, 3, 4, 6]),  # 3, 5 and 7 tie: 3 is shallowest
    (6, [1, 2, 3, 4, 5, 6]),
    (7, [1, 2, 3, 4, 5, 6, 7]),
    (50, [1, 2, 3, 4, 5, 6, 7]),
])
def test_pruning_keeps_exactly_the_best_nodes(max_nodes, kept):
    tree = grown_tree()
    pruned = tree.prune(max_nodes, whole_groups=False)
    assert len(pruned.tokens) == 1 + min(max_nodes, 7)
    assert sorted(pruned.source[1:]) == kept
    # Topological order, siblings in drafting order: by depth, then by drafting index.
    assert pruned.source == [0] + sorted(kept, key=lambda i: (tree.depths[i], i))
    assert pruned.tokens == [tree.tokens[i] for i in pruned.source]
    assert pruned.depths == [tree.depths[i] for i in pruned.source]
    for node in range(1, len(pruned.source)):
        assert pruned.source[pruned.parents[node]] == tree.parents[pruned.source[node]]
    assert pruned.parents[0] == -1


def test_whole_groups_are_kept_whole():
    tree = grown_tree()
    pruned = tree.prune(3, whole_groups=True)  # multi-draft trees were grown within budget
    assert pruned.source == [0, 1, 2, 3, 4, 5, 6, 7]
    assert tree.prune(3, whole_groups=True, min_logprob=-0.75).source == pruned.source  # no floor either


@pytest.mark.parametrize("min_logprob,max_nodes,kept", [
    (-1.0, 50, [1, 2, 4]),  # the floor is inclusive: 2 and 4 sit on it
    (-0.99, 50, [1]),
    (-1.25, 50, [1, 2, 4, 6]),
    (-1.25, 2, [1, 2]),  # the floor and the budget: the stricter wins
    (-0.4, 50, []),  # nothing drafted is good enough: the root alone
    (-math.inf, 50, [1, 2, 3, 4, 5, 6, 7]),
])
def test_pruning_drops_nodes_below_the_floor(min_logprob, max_nodes, kept):
    pruned = grown_tree().prune(max_nodes, whole_groups=False, min_logprob=min_logprob)
    assert sorted(pruned.source[1:]) == kept and pruned.parents[0] == -1


def test_min_prob_is_validated():
    for bad in (-0.1, 1.5, math.nan, "0.1", True):
        with pytest.raises(ValueError, match="min_prob"):
            TreeConfig(min_prob=bad)


def test_alpha_floor():
    config = TreeConfig(alpha=0.02, min_alpha=1e-3)
    alpha, seen = 0.02, []
    for _ in range(12):  # every step accepts its whole branch: halve, down to the floor
        alpha = next_alpha(alpha, 3, 3, config)
        seen.append(alpha)
    assert seen[:4] == [0.01, 0.005, 0.0025, 0.00125]
    assert seen[4:] == [1e-3] * 8
    assert next_alpha(4e-4, 2, 2, config) == 4e-4  # already below the floor (e.g. 0): left as it is
    assert next_alpha(0.0, 2, 2, config) == 0.0
    assert next_alpha(0.3, 1, 4, config) == pytest.approx(0.75)  # the rejected fraction
    assert next_alpha(0.3, 0, 0, config) == 0.3  # nothing drafted: nothing learned
    assert next_alpha(0.3, 1, 4, TreeConfig(adaptive=False)) == 0.3


@pytest.mark.parametrize("config", [
    TreeConfig(max_depth=4, top_k=1, max_nodes=4, alpha=0.0),  # a chain
    TreeConfig(max_depth=4, top_k=2, max_nodes=7, alpha=0.0),  # pruned to 7 of up to 14
    TreeConfig(max_depth=5, top_k=3, max_nodes=10),  # adaptive alpha
])
def test_own_draft_accepts_the_whole_branch(config, monkeypatch):
    """With the target as its own draft (greedy), the draft's best child of every node is the
    target's choice, so every walk ends at a leaf: accepted == the depth the branch was drafted to."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)  # peaked: no near-ties between the two forwards
    seen = []
    original = step_module.next_alpha

    def recording(alpha, accepted, drafted_depth, cfg):
        seen.append((accepted, drafted_depth))
        return original(alpha, accepted, drafted_depth, cfg)

    monkeypatch.setattr(step_module, "next_alpha", recording)
    inputs = prompts(3, 6, seed=4)
    out = model.generate(**inputs, custom_generate=tree_speculative, draft_model=model, tree_config=config,
                         max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=0))
    assert len(seen) == 3 * out.num_accepted.shape[0]
    assert all(accepted == depth for accepted, depth in seen), seen
    assert max(depth for _, depth in seen) >= 2



@pytest.mark.parametrize("do_sample", [False, True])
def test_the_draft_is_never_fed_an_accepted_token_twice(do_sample, monkeypatch):
    """The draft keeps the cache slots of the accepted tokens it was already fed (every accepted
    node but the branch's last one was expanded, so fed): after the first step each row feeds only
    what it has not seen, the unexpanded last accepted node and the bonus token, at most 2 tokens.
    Feeding more is still lossless, so only this count shows the draft's cache losing those slots."""
    from fusedecode.hf.speculative import drafter as drafter_module

    model = tiny_model("llama", seed=3)
    draft = tiny_model("llama", seed=5)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    fed = []
    original = drafter_module.Drafter.feed

    def recording(self, pending, committed):
        fed.append([len(chain) for chain in pending])
        return original(self, pending, committed)

    monkeypatch.setattr(drafter_module.Drafter, "feed", recording)
    inputs = prompts(3, 6, seed=4)
    for draft_model in (model, draft):
        fed.clear()
        torch.manual_seed(0)
        out = model.generate(**inputs, custom_generate=tree_speculative, draft_model=draft_model,
                             tree_config=TreeConfig(max_depth=4, top_k=2, max_nodes=8, alpha=0.0),
                             max_new_tokens=20, do_sample=do_sample, pad_token_id=0, return_dict_in_generate=True)
        accepted = out.num_accepted.tolist()
        assert len(fed) >= 3 and max(max(step) for step in fed[1:]) <= 2, fed
        if draft_model is model and not do_sample:
            assert max(max(step) for step in accepted) >= 2  # branches long enough that re-feeding would show


def test_end_of_sequence_drafts_are_leaves(monkeypatch):
    """A drafted EOS ends its row, so nothing drafted after it could be emitted: the draft is never
    fed an EOS node (growing past it cost about a fifth of the draft forwards on the demo's
    problems), the trees still contain drafted EOS tokens, and the text is plain greedy decoding's."""
    from fusedecode.demo import arithmetic
    from fusedecode.demo.demo import load
    from fusedecode.hf import bundled_model_path
    from fusedecode.hf.speculative import drafter as drafter_module

    target, tokenizer = load(bundled_model_path("target"))
    draft, _ = load(bundled_model_path("draft"))
    fed, drafted = [], []
    original = drafter_module.Drafter._feed_frontier

    def recording(self, trees, feeds, levels, positions):
        fed.extend(tree.tokens[node] for tree, feed in zip(trees, feeds) for node in feed)
        drafted.extend(token for tree in trees for token in tree.tokens[1:])
        return original(self, trees, feeds, levels, positions)

    monkeypatch.setattr(drafter_module.Drafter, "_feed_frontier", recording)
    enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in arithmetic.evaluation_problems(3)], return_tensors="pt",
                    padding=True)
    kwargs = dict(max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = target.generate(**enc, custom_generate=tree_speculative, draft_model=draft,
                          tree_config=TreeConfig(max_depth=32, top_k=2, max_nodes=32), **kwargs)
    assert torch.equal(out, target.generate(**enc, **kwargs))
    eos = tokenizer.eos_token_id
    assert eos in drafted and fed and eos not in fed


def test_min_prob_keeps_only_likely_nodes_and_the_text(monkeypatch):
    """With ``min_prob`` no node the target scores has a cumulative draft probability below it (the
    growth stops there too, saving draft forwards), and the greedy text is unchanged."""
    from fusedecode.demo import arithmetic
    from fusedecode.demo.demo import load
    from fusedecode.hf import bundled_model_path
    from fusedecode.hf.speculative import draft_tree as draft_tree_module

    target, tokenizer = load(bundled_model_path("target"))
    draft, _ = load(bundled_model_path("draft"))
    lowest = []
    original = draft_tree_module.DraftTree.prune

    def recording(self, max_nodes, whole_groups, min_logprob=-math.inf):
        pruned = original(self, max_nodes, whole_groups, min_logprob)
        lowest.append(min([self.cum_logprob[i] for i in pruned.source[1:]], default=0.0))
        return pruned

    monkeypatch.setattr(draft_tree_module.DraftTree, "prune", recording)
    enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in arithmetic.evaluation_problems(3)], return_tensors="pt",
                    padding=True)
    kwargs = dict(max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = target.generate(**enc, **kwargs)
    for min_prob in (0.0, 0.3):
        lowest.clear()
        out = target.generate(**enc, custom_generate=tree_speculative, draft_model=draft,
                              tree_config=TreeConfig(max_depth=32, top_k=2, max_nodes=32, min_prob=min_prob), **kwargs)
        assert torch.equal(out, plain) and lowest
        if min_prob == 0:
            assert min(lowest) < math.log(0.3)  # without a floor, unlikely nodes are scored
        else:
            assert min(lowest) >= math.log(min_prob)
