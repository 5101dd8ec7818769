"""verify_tree (docs/semantics.md#verify_tree) on every backend: fixtures, brute force, losslessness, statistics."""

import hashlib
import math

import numpy as np
import pytest
import torch

import fusedecode
from fusedecode.tree import tree_from_paths
from helpers import assert_close_to_reference, chi_square_pvalue, interpreted


def verify(target, logits, tokens, parents, **kwargs):
    device, backend = target
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kwargs = {k: to(v) for k, v in kwargs.items()}
    return fusedecode.verify_tree(to(logits), to(tokens), to(parents), backend=backend, **kwargs)


def peaked_logits(argmaxes, vocab, dtype=torch.float32):
    """[B, N, V] logits whose argmax at [b, i] is argmaxes[b][i]."""
    logits = torch.randn(len(argmaxes), len(argmaxes[0]), vocab).mul(0.5)
    for b, row in enumerate(argmaxes):
        for i, token in enumerate(row):
            logits[b, i, token] = 10.0
    return logits.to(dtype)


# ------------------------------------------------------------------------------------------------
# Hand-built fixtures (greedy)

def test_chain_accepts_the_matching_prefix_and_emits_the_targets_token(target):
    # Root 0 -> 1 -> 2 -> 3 (tokens 5, 6, 7); the target wants 5, 6, then 9: two accepted, emit 9.
    tokens = torch.tensor([[0, 5, 6, 7]])
    parents = torch.tensor([-1, 0, 1, 2])
    out = verify(target, peaked_logits([[5, 6, 9, 1]], 12), tokens, parents)
    assert out.num_accepted.tolist() == [2]
    assert out.accepted_nodes.tolist() == [[0, 1, 2, -1]]
    assert out.output_tokens.tolist() == [[5, 6, 9, -1]]


def test_leaf_gives_bonus_token(target):
    tokens = torch.tensor([[0, 5, 6]])
    parents = torch.tensor([-1, 0, 1])
    out = verify(target, peaked_logits([[5, 6, 11]], 12), tokens, parents)
    assert out.num_accepted.tolist() == [2]
    assert out.output_tokens.tolist() == [[5, 6, 11]]


def test_bushy_tree_and_duplicate_siblings(target):
    # Root children: 1 (tok 4), 2 (tok 7), 3 (tok 7 again), 4 (tok 2); node 3 has child 5 (tok 8).
    tokens = torch.tensor([[0, 4, 7, 7, 2, 8]])
    parents = torch.tensor([-1, 0, 0, 0, 0, 3])
    # Target wants 7 at the root: the first child with token 7 (node 2) wins, a leaf: bonus from row 2.
    out = verify(target, peaked_logits([[7, 0, 3, 8, 0, 1]], 10), tokens, parents)
    assert out.accepted_nodes.tolist() == [[0, 2, -1]]
    assert out.output_tokens.tolist() == [[7, 3, -1]]


def test_padding_is_never_accepted(target):
    tokens = torch.tensor([[0, -1, 3]])
    parents = torch.tensor([-1, 0, 0])
    out = verify(target, peaked_logits([[3, 0, 5]], 8), tokens, parents)
    assert out.accepted_nodes.tolist() == [[0, 2]]
    assert out.output_tokens.tolist() == [[3, 5]]


def test_single_node_tree(target):
    logits = peaked_logits([[4], [2]], 6)
    out = verify(target, logits, torch.zeros((2, 1), dtype=torch.int64), torch.tensor([-1]))
    assert out.num_accepted.tolist() == [0, 0]
    assert out.output_tokens.tolist() == [[4], [2]]
    assert out.accepted_nodes.tolist() == [[0], [0]]


def test_per_row_trees(target):
    tokens = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    parents = torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, 0]])  # a chain, and a star
    logits = peaked_logits([[1, 2, 3, 0], [3, 0, 0, 5]], 6)
    out = verify(target, logits, tokens, parents)
    assert out.num_accepted.tolist() == [3, 1]
    assert out.output_tokens.tolist() == [[1, 2, 3, 0], [3, 5, -1, -1]]
    assert out.accepted_nodes.tolist() == [[0, 1, 2, 3], [0, 3, -1, -1]]


def test_nan_row_stops_the_walk(target):
    tokens = torch.tensor([[0, 5, 6]])
    parents = torch.tensor([-1, 0, 1])
    logits = peaked_logits([[5, 6, 1]], 8)
    logits[0, 1, 3] = math.nan
    out = verify(target, logits, tokens, parents)
    assert out.num_accepted.tolist() == [1]
    assert out.output_tokens.tolist() == [[5, -1, -1]]


# ------------------------------------------------------------------------------------------------
# Greedy on random trees: brute force and losslessness

def random_parents(nodes, generator):
    parents = [-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, nodes)]
    return torch.tensor(parents)


def brute_force_greedy(logits, tokens, parents):
    batch, nodes, _ = logits.shape
    results = []
    for b in range(batch):
        p = parents if parents.dim() == 1 else parents[b]
        node, path, emitted = 0, [0], []
        while True:
            best = int(torch.argmax(logits[b, node].float()))
            kids = [c for c in range(1, nodes) if int(p[c]) == node and int(tokens[b, c]) == best]
            if not kids:
                emitted.append(best)
                break
            node = kids[0]
            path.append(node)
            emitted.append(best)
        results.append((path, emitted))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nodes,vocab", [(2, 5), (9, 7), (33, 300), (64, 2500)])
def test_greedy_random_trees_against_brute_force(target, nodes, vocab, dtype, generator):
    batch = 6
    parents = torch.stack([random_parents(nodes, generator) for _ in range(batch)])
    tokens = torch.randint(0, vocab, (batch, nodes), generator=generator)
    tokens[:, 0] = 0
    logits = torch.randn((batch, nodes, vocab), generator=generator)
    # Make the target agree with some child most of the time so that paths go deep.
    for b in range(batch):
        for r in range(nodes):
            kids = [c for c in range(1, nodes) if int(parents[b, c]) == r]
            if kids and float(torch.rand((), generator=generator)) < 0.8:
                pick = kids[int(torch.randint(0, len(kids), (), generator=generator))]
                logits[b, r, tokens[b, pick]] = 20.0
    logits = logits.to(dtype)
    out = verify(target, logits, tokens, parents)
    for b, (path, emitted) in enumerate(brute_force_greedy(logits, tokens, parents)):
        count = len(path) - 1
        assert int(out.num_accepted[b]) == count
        assert out.accepted_nodes[b, :count + 1].tolist() == path
        assert out.output_tokens[b, :count + 1].tolist() == emitted
        assert (out.output_tokens[b, count + 1:] == -1).all()


class ToyModel:
    """A 'language model' whose next-token logits depend on the whole prefix (hash-seeded)."""

    def __init__(self, vocab, scale, salt):
        self.vocab, self.scale, self.salt = vocab, scale, salt

    def logits(self, prefix):
        digest = hashlib.sha256(f"{self.salt}:{list(prefix)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**62 - 1))
        return torch.randn(self.vocab, generator=g, dtype=torch.float64) * self.scale

    def probs(self, prefix, temperature):
        return torch.softmax(self.logits(prefix) / temperature, -1)


def tree_logits(model, tokens, parents):
    """Target logits of a tree for one forward pass: row i = logits after the path to node i."""
    nodes = tokens.shape[0]
    paths = [[int(tokens[0])]]
    for i in range(1, nodes):
        paths.append(paths[int(parents[i])] + [int(tokens[i])])
    return torch.stack([model.logits(path) for path in paths])


def test_greedy_is_lossless(target, generator):
    model = ToyModel(vocab=6, scale=2.0, salt="greedy")
    batch = 8
    all_logits, all_tokens, parents = [], [], None
    for b in range(batch):
        # A tree with the target's greedy continuation hidden among other branches.
        prefix = [b % 6]
        greedy = []
        for _ in range(3):
            greedy.append(int(torch.argmax(model.logits(prefix + greedy))))
        paths = [[(greedy[0] + 1) % 6], greedy[:1] + [(greedy[1] + 2) % 6], greedy, [(greedy[0] + 3) % 6, 1]]
        tokens, parents_b = tree_from_paths(paths if b % 2 else paths[::-1], root_token=prefix[0])
        pad = 8 - tokens.shape[0]
        tokens = torch.cat([tokens, torch.full((pad,), -1)])
        parents_b = torch.cat([parents_b, torch.zeros(pad, dtype=torch.int64)])
        if parents is None:
            parents = []
        parents.append(parents_b)
        all_tokens.append(tokens)
        all_logits.append(tree_logits(model, tokens.clamp_min(0), parents_b))
    out = verify(target, torch.stack(all_logits).float(), torch.stack(all_tokens), torch.stack(parents))
    for b in range(batch):
        prefix = [b % 6]
        count = int(out.num_accepted[b])
        emitted = out.output_tokens[b, :count + 1].tolist()
        expected = []
        for _ in range(count + 1):
            expected.append(int(torch.argmax(model.logits(prefix + expected))))
        assert emitted == expected
        assert count == 3  # every tree holds the 3-token greedy continuation: the walk accepts all of it


# ------------------------------------------------------------------------------------------------
# Sampling: the emitted sequence follows the target (chi-square on the first two tokens)

def build_sampling_batch(model, draft, temperature, batch, generator, children_per_node=(3, 2)):
    """Trees drafted i.i.d. from the draft model: root gets k1 children, each of them k2 children."""
    k1, k2 = children_per_node
    nodes = 1 + k1 + k1 * k2
    parents = torch.tensor([-1] + [0] * k1 + [1 + i // k2 for i in range(k1 * k2)])
    root = 0
    tokens = torch.zeros((batch, nodes), dtype=torch.int64)
    q_root = draft.probs([root], temperature)
    first = torch.multinomial(q_root, batch * k1, replacement=True, generator=generator).view(batch, k1)
    tokens[:, 1:1 + k1] = first
    logits = torch.zeros((batch, nodes, model.vocab), dtype=torch.float64)
    probs = torch.zeros((batch, nodes, model.vocab), dtype=torch.float64)
    cache_p, cache_q = {}, {}

    def target_logits(prefix):
        key = tuple(prefix)
        if key not in cache_p:
            cache_p[key] = model.logits(prefix)
        return cache_p[key]

    def draft_probs(prefix):
        key = tuple(prefix)
        if key not in cache_q:
            cache_q[key] = draft.probs(prefix, temperature)
        return cache_q[key]

    for b in range(batch):
        for i in range(k1):
            child = 1 + i
            q_child = draft_probs([root, int(tokens[b, child])])
            grand = torch.multinomial(q_child, k2, replacement=True, generator=generator)
            tokens[b, 1 + k1 + i * k2: 1 + k1 + (i + 1) * k2] = grand
        paths = [[root]]
        for i in range(1, nodes):
            paths.append(paths[int(parents[i])] + [int(tokens[b, i])])
        for i, path in enumerate(paths):
            logits[b, i] = target_logits(path)
            probs[b, i] = draft_probs(path)
    return logits.float(), tokens, parents, probs.float()


def first_two_tokens(out, model, temperature, generator):
    """First and second token of the generated sequence (sampling the target for the second when
    the verification stopped after one token)."""
    first = out.output_tokens[:, 0].cpu()
    second = out.output_tokens[:, 1].cpu().clone()
    for b in torch.nonzero(out.num_accepted.cpu() == 0).flatten().tolist():
        p = model.probs([0, int(first[b])], temperature)
        second[b] = int(torch.multinomial(p, 1, generator=generator))
    return first, second


@pytest.mark.parametrize("mode", ["target_only", "multi_draft"])
def test_sampling_reproduces_the_target_distribution(target, mode):
    device, backend = target
    temperature = 0.9
    model = ToyModel(vocab=5, scale=1.2, salt="target")
    draft = ToyModel(vocab=5, scale=1.2, salt="draft")  # a different, imperfect draft
    generator = torch.Generator().manual_seed(1234)
    batch = 200 if interpreted(target) else 3000
    shape = (2, 2) if interpreted(target) else (3, 2)
    logits, tokens, parents, probs = build_sampling_batch(model, draft, temperature, batch, generator, shape)
    seeds = torch.arange(batch, dtype=torch.int64) * 7919 + 17
    kwargs = dict(temperature=temperature, seed=seeds)
    if mode == "multi_draft":
        kwargs["draft_probs"] = probs
    out = verify(target, logits, tokens, parents, **kwargs)
    first, second = first_two_tokens(out, model, temperature, generator)
    p_root = model.probs([0], temperature)
    counts = torch.bincount(first, minlength=5)
    assert chi_square_pvalue(counts, p_root) > 1e-3, (counts, p_root * batch)
    joint = torch.zeros(25, dtype=torch.float64)
    for t in range(5):
        joint[t * 5:(t + 1) * 5] = p_root[t] * model.probs([0, t], temperature)
    pair_counts = torch.bincount(first * 5 + second, minlength=25)
    assert chi_square_pvalue(pair_counts, joint) > 1e-3
    # The tree is actually used: some draft tokens are accepted.
    assert out.num_accepted.float().mean() > 0.25


def test_same_seed_same_result(target):
    model = ToyModel(vocab=7, scale=1.0, salt="repeat")
    generator = torch.Generator().manual_seed(5)
    batch = 12 if interpreted(target) else 64
    logits, tokens, parents, probs = build_sampling_batch(model, model, 1.0, batch, generator, (2, 2))
    for kwargs in (dict(), dict(draft_probs=probs)):
        a = verify(target, logits, tokens, parents, temperature=1.0, seed=42, **kwargs)
        b = verify(target, logits, tokens, parents, temperature=1.0, seed=torch.tensor(42), **kwargs)
        c = verify(target, logits, tokens, parents, temperature=1.0, seed=43, **kwargs)
        assert torch.equal(a.output_tokens, b.output_tokens) and torch.equal(a.accepted_nodes, b.accepted_nodes)
        assert not torch.equal(a.output_tokens, c.output_tokens)


def test_seed_none_follows_torch_manual_seed(target):
    """seed=None draws the seed from torch's default generator: the same manual seed gives the same
    draws, a different one (or the generator's next state) different draws."""
    model = ToyModel(vocab=7, scale=1.0, salt="none")
    generator = torch.Generator().manual_seed(6)
    batch = 12 if interpreted(target) else 64
    logits, tokens, parents, probs = build_sampling_batch(model, model, 1.0, batch, generator, (2, 2))
    for kwargs in (dict(), dict(draft_probs=probs)):
        runs = {}
        for name, manual_seed in (("a", 3), ("b", 3), ("c", 4)):
            torch.manual_seed(manual_seed)
            runs[name] = verify(target, logits, tokens, parents, temperature=1.0, **kwargs).output_tokens
        runs["next"] = verify(target, logits, tokens, parents, temperature=1.0, **kwargs).output_tokens
        assert torch.equal(runs["a"], runs["b"])
        assert not torch.equal(runs["a"], runs["c"])
        assert not torch.equal(runs["c"], runs["next"])


# ------------------------------------------------------------------------------------------------
# stats come from the same pass and equal logit_stats

@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_stats_equal_logit_stats(target, temperature, generator):
    device, backend = target
    logits = torch.randn((3, 9, 3000), generator=generator).to(torch.bfloat16)
    tokens = torch.randint(0, 3000, (3, 9), generator=generator)
    parents = random_parents(9, generator)
    out = verify(target, logits, tokens, parents, temperature=temperature, seed=1)
    stats_t = temperature if temperature > 0 else 1.0
    assert_close_to_reference(out.stats, logits, temperature=stats_t)


# ------------------------------------------------------------------------------------------------
# Validation

GOOD = dict(logits=torch.zeros(2, 3, 10), tokens=torch.zeros(2, 3, dtype=torch.int64),
            parents=torch.tensor([-1, 0, 1]))


@pytest.mark.parametrize("change,match", [
    (dict(logits=torch.zeros(2, 3)), "target_logits"),
    (dict(logits=torch.zeros(2, 3, 10, dtype=torch.int32)), "target_logits"),
    (dict(tokens=torch.zeros(2, 3)), "draft_tokens"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.int64)), "draft_tokens"),
    (dict(tokens=torch.tensor([[0, 10, 0], [0, 0, 0]])), "draft_tokens"),
    (dict(tokens=torch.tensor([[0, -2, 0], [0, 0, 0]])), "draft_tokens"),
    (dict(parents=torch.tensor([0, 0, 1])), "parents"),
    (dict(parents=torch.tensor([-1, 1, 1])), "parents"),
    (dict(parents=torch.tensor([-1, 0, 3])), "parents"),
    (dict(parents=torch.tensor([-1, 0])), "parents"),
    (dict(parents=torch.tensor([-1.0, 0.0, 1.0])), "parents"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(draft_probs=torch.zeros(2, 3, 11), temperature=1.0), "draft_probs"),
    (dict(draft_probs=torch.zeros(2, 2, 10), temperature=1.0), "draft_probs"),
    (dict(draft_probs=torch.zeros(2, 3, 10, dtype=torch.int64), temperature=1.0), "draft_probs"),
    (dict(draft_probs=torch.zeros(2, 3, 20)[:, :, ::2], temperature=1.0), "draft_probs"),  # strided vocabulary
    (dict(draft_probs=torch.zeros(2, 10, 3).transpose(1, 2), temperature=1.0), "draft_probs"),
    (dict(draft_probs=torch.full((2, 3, 10), 0.1)), "draft_probs.*temperature 0"),  # the default temperature
    (dict(draft_probs=torch.full((2, 3, 10), 0.1), temperature=0.0), "draft_probs.*temperature 0"),
    (dict(seed=1.5), "seed"),
    (dict(seed=torch.tensor([1, 2, 3])), "seed"),
    (dict(seed=torch.tensor(1, dtype=torch.int32)), "seed"),
])
def test_invalid_arguments_raise_value_error_naming_them(change, match):
    args = dict(GOOD)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("temperature", "draft_probs", "seed") if k in args}
    with pytest.raises(ValueError, match=match):
        fusedecode.verify_tree(args["logits"], args["tokens"], args["parents"], backend="torch", **kwargs)


@pytest.mark.parametrize("temperature", [0.0, np.float32(0.0)])
def test_draft_probs_are_refused_when_greedy(target, temperature):
    """Greedy verification never reads draft_probs: passing them is refused, validate=False or not,
    rather than silently ignored (a caller who meant to sample would get greedy output)."""
    logits, tokens, parents = torch.zeros(2, 3, 10), torch.zeros(2, 3, dtype=torch.int64), torch.tensor([-1, 0, 1])
    for validate in (True, False):
        with pytest.raises(ValueError, match="draft_probs"):
            verify(target, logits, tokens, parents, temperature=temperature, draft_probs=torch.full((2, 3, 10), 0.1),
                   validate=validate)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_validate_false_skips_value_checks(target, temperature):
    """Values validate=True rejects (a draft token outside [0, V), a parent after its child, a parent
    out of range) reach the kernel with validate=False and give the documented memory-safe result:
    such tokens are never accepted and such nodes are unreachable."""
    vocab = 10
    # Root children: node 1 (token 10 = V), node 2 (token 3, parent 4: after it), node 3 (token 3,
    # parent 9: out of range), node 4 (token 3: the one reachable child drafting 3) with child 5 (token 12).
    tokens = torch.tensor([[0, 10, 3, 3, 3, 12]])
    parents = torch.tensor([-1, 0, 4, 9, 0, 4])
    logits = torch.full((1, 6, vocab), -5.0)
    logits[0, :, 3] = 5.0  # the target wants 3 everywhere ...
    logits[0, 0, 9] = 6.0  # ... but 9 (not 10: V = 10 has no logit) at the root
    with pytest.raises(ValueError, match="draft_tokens|parents"):
        verify(target, logits, tokens, parents, temperature=temperature, seed=1)
    for bad_tokens, bad_parents, match in ((tokens.clamp(max=10), torch.tensor([-1, 0, 0, 0, 0, 4]), "draft_tokens"),
                                           (tokens.clamp(max=9), parents, "parents")):
        with pytest.raises(ValueError, match=match):
            verify(target, logits, bad_tokens, bad_parents, temperature=temperature, seed=1)
    logits[0, 0, 9] = -5.0
    logits[0, 0, 3] = 8.0  # now 3 at the root: only node 4 may take it
    probs = torch.full((1, 6, vocab), 1.0 / vocab)
    for kwargs in (dict(), dict(draft_probs=probs)) if temperature > 0 else (dict(),):
        out = verify(target, logits, tokens, parents, temperature=temperature, seed=1, validate=False, **kwargs)
        accepted = out.accepted_nodes[0, :int(out.num_accepted[0]) + 1].tolist()
        assert set(accepted) <= {0, 4, 5} and 5 not in accepted, accepted  # node 5 drafts 12: never accepted
        emitted = out.output_tokens[0, :int(out.num_accepted[0]) + 1]
        assert bool(((emitted >= 0) & (emitted < vocab)).all()), out.output_tokens
        if temperature == 0:
            assert accepted == [0, 4] and emitted.tolist() == [3, 3]


def test_sampling_across_slices_and_misaligned_rows(target):
    # Probability mass spread over tokens in different 4096-token slices; rows start off a 16-byte
    # boundary. The first emitted token must follow the target's distribution.
    device, backend = target
    vocab = 12000
    batch = 160 if interpreted(target) else 2500
    support = torch.tensor([3, 900, 4095, 4096, 4100, 6000, 8191, 8192, 9000, 11000, 11998, 11999])
    values = torch.linspace(-1.0, 1.5, len(support))
    row = torch.full((vocab,), -math.inf)
    row[support] = values
    storage = torch.full((batch, 3, vocab + 1), -math.inf)
    storage[:, :, 1:] = row
    logits = storage[:, :, 1:]  # last dim contiguous, rows misaligned by one element
    tokens = torch.zeros((batch, 3), dtype=torch.int64)
    tokens[:, 1], tokens[:, 2] = 4096, 11999
    parents = torch.tensor([-1, 0, 0])
    seeds = torch.arange(batch, dtype=torch.int64) * 104729 + 3
    out = verify(target, logits, tokens, parents, temperature=0.8, seed=seeds)
    first = out.output_tokens[:, 0].cpu()
    assert torch.isin(first, support).all()
    counts = torch.bincount(torch.searchsorted(support, first), minlength=len(support))
    assert chi_square_pvalue(counts, torch.softmax(values.double() / 0.8, -1)) > 1e-3


# ------------------------------------------------------------------------------------------------
# Custom op registration

def test_opcheck_native_verify_op(generator):
    if fusedecode.backends.unavailable_reason("cpp", "cpu"):
        pytest.skip("cpp backend unavailable: extension not built")
    logits = torch.randn((2, 5, 300), generator=generator)
    tokens = torch.randint(0, 300, (2, 5), generator=generator)
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]])
    seeds = torch.tensor([3, 4])
    probs = torch.softmax(torch.randn((2, 5, 300), generator=generator), -1)
    for temperature, q in ((0.0, None), (0.7, None), (0.7, probs)):
        torch.library.opcheck(torch.ops.fusedecode.verify_tree.default, (logits, tokens, parents, temperature, q,
                                                                         seeds, 3))


def test_torch_compile_fullgraph():
    # The fused backends are custom ops with fake kernels; the torch reference walks trees in Python
    # loops and is not meant to be traced.
    backend = "cpp"
    if fusedecode.backends.unavailable_reason(backend, "cpu"):
        pytest.skip("cpp backend unavailable: extension not built")
    torch._dynamo.reset()
    tokens = torch.tensor([[0, 5, 6, 7]])
    parents = torch.tensor([-1, 0, 1, 2])

    def step(logits, seed):
        out = fusedecode.verify_tree(logits, tokens, parents, temperature=0.0, seed=seed, backend=backend)
        return out.num_accepted, out.output_tokens, out.stats.entropy

    compiled = torch.compile(step, fullgraph=True)
    logits = peaked_logits([[5, 6, 9, 1]], 12)
    got = compiled(logits, torch.tensor(1))
    want = step(logits, torch.tensor(1))
    assert torch.equal(got[0], want[0])
    # Under compile the depth cannot be read from the tree: outputs are N wide, same prefix.
    assert torch.equal(got[1][:, :want[1].shape[1]], want[1])
    torch.testing.assert_close(got[2], want[2])
