"""The CUDA verify_tree (launch_verify_tree in csrc/include/fusedecode/verify_tree.cuh: the statistics
pass and the tree walk), executed on the CPU by the emulator.

The walk is the cpp backend's (tree_walk.h) and takes the same Philox draws, so the emulated kernels
pick the cpp backend's tokens: exactly when greedy; when sampling, both must equal the float64 walk
with those draws (exact_walk.py) except where a draw lands within float32 rounding of a threshold (a
token's cumulative-probability boundary, an acceptance ratio), which float32 sums (CUDA) and float64
sums (cpp) may then decide differently. Covered: greedy, target-only and multi-draft sampling, for
vocabularies from 1 token to several 4096-token slices; every node row's statistics against the
float64 reference; garbage trees (validate=False) inside fenced buffers.
"""

import math

import pytest
import torch

import fusedecode
from cuda_emulation.emulator import RUNS, every_memory
from cuda_emulation.exact_walk import exact_walk
from fusedecode.tree import tree_from_paths
from helpers import (assert_close_to_reference, check_walk_invariants, float64_reference, random_logits,
                     reachable)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Around the 4096-token slices of the statistics pass: one slice (where the sampling pass once read
# slice states that pass 1 never wrote), exactly one, one token more, several.
VOCABS = [1, 2, 5, 100, 1000, 4095, 4096, 4097, 9000]


def cpp_verify_tree(logits, tokens, parents, **kwargs):
    return fusedecode.verify_tree(logits, tokens, parents, backend="cpp", **kwargs)


def emulated_verify_tree(emulator, logits, tokens, parents, depth, *, temperature=0.0, draft_probs=None, seed=0):
    """launch_verify_tree with verify_tree's arguments as the public function prepares them, in every
    memory setup of RUNS: one TreeVerification per run."""
    batch, nodes, _ = logits.shape
    token_rows = tokens.to(torch.int64).expand(batch, nodes)
    parent_rows = parents.to(torch.int64).expand(batch, nodes)
    seeds = seed if isinstance(seed, torch.Tensor) else torch.full((batch,), seed, dtype=torch.int64)
    probs = draft_probs if temperature > 0 else None
    results = every_memory(lambda memory: emulator.verify_tree(logits, token_rows, parent_rows, temperature, probs,
                                                               seeds.expand(batch), depth, memory=memory))
    return [_as_tree_verification(r) for r in results]


def _as_tree_verification(fields):
    stats = fusedecode.LogitStats(**{name: fields[name] for name in fusedecode.LogitStats._fields
                                     if name in fields})
    return fusedecode.TreeVerification(fields["num_accepted"], fields["accepted_nodes"], fields["output_tokens"],
                                       stats)


def assert_same_walk(got, want, context):
    for field in ("num_accepted", "accepted_nodes", "output_tokens"):
        assert torch.equal(getattr(got, field), getattr(want, field)), (
            f"{field} differs from the cpp backend {context}\nemulated CUDA {getattr(got, field).tolist()}\n"
            f"cpp {getattr(want, field).tolist()}")


def random_tree(batch, nodes, vocab, generator, target_logits=None):
    """Parents of a random tree; draft tokens mostly the target's likely tokens (so walks go deep)."""
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, nodes)])
    tokens = torch.randint(0, vocab, (batch, nodes), generator=generator)
    if target_logits is not None:
        likely = target_logits.float().topk(min(3, vocab), dim=-1).indices  # [B, N, 3]
        pick = torch.randint(0, likely.shape[-1], (batch, nodes), generator=generator)
        parent_rows = parents.clamp(min=0).expand(batch, nodes)
        from_parent = likely.gather(1, parent_rows[..., None].expand(-1, -1, likely.shape[-1]))
        tokens = torch.where(torch.rand((batch, nodes), generator=generator) < 0.8,
                             from_parent.gather(2, pick[..., None])[..., 0], tokens)
    tokens[:, 0] = 0
    return tokens, parents


def walk_rows(result):
    """Each batch row's walk as (accepted nodes, emitted tokens), the -1 padding dropped."""
    rows = []
    for b in range(result.num_accepted.shape[0]):
        count = int(result.num_accepted[b])
        emitted = result.output_tokens[b, :count + 1].tolist()
        rows.append((result.accepted_nodes[b, :count + 1].tolist(), emitted[:count] + [t for t in emitted[count:]
                                                                                      if t != -1]))
    return rows


def rounding_tolerance(vocab):
    """How close to a threshold a draw may land for float32 sums of up to V weights (each off by up to
    an ulp, all in the same direction on a flat row) to decide it differently from float64."""
    return 4 * vocab * 2.0**-24 + 1e-6


def exact_walks(emulator, logits, tokens, parents, temperature, draft_probs, seeds, width):
    """The float64 walk of every batch row (exact_walk.py) with the kernels' Philox draws."""
    batch, nodes, _ = logits.shape
    tokens, parents = tokens.expand(batch, nodes), parents.expand(batch, nodes)
    return [exact_walk(logits[b], tokens[b], parents[b], temperature,
                       draft_probs[b] if draft_probs is not None else None, int(seeds[b]), b, width, emulator.uniform)
            for b in range(batch)]


def check_against_exact_walk(result, exact, vocab, backend):
    """Every row of ``result`` follows its float64 walk ``exact`` (``exact_walks``), except rows whose
    path met a draw within rounding of its threshold; those may be at most a few."""
    tolerance = rounding_tolerance(vocab)
    excused = []
    for b, ((accepted, emitted), walk) in enumerate(zip(walk_rows(result), exact)):
        if (accepted, emitted) == (walk.accepted_nodes, walk.output_tokens):
            continue
        assert walk.margin <= tolerance, (
            f"{backend} row {b}: walk {accepted} emitting {emitted}, but the float64 walk with the same draws "
            f"gives {walk.accepted_nodes} emitting {walk.output_tokens}, its nearest draw {walk.margin:.3g} "
            f"from a threshold (rounding allows {tolerance:.3g})")
        excused.append(b)
    assert len(excused) <= 2 + len(exact) // 20, f"{backend}: rows {excused} all differ from the float64 walk"


def compare_with_cpp(emulator, logits, tokens, parents, *, temperature, draft_probs=None, seeds=None,
                     context=""):
    """The emulated CUDA walk, in every memory setup, equals the cpp backend's with the same seeds:
    both follow the float64 walk with the same draws, except where a draw falls within float32
    rounding of a threshold. The statistics of every node row are checked against the reference.
    Returns the cpp result."""
    batch = logits.shape[0]
    seeds = seeds if seeds is not None else torch.arange(batch, dtype=torch.int64) * 1000003 + 17
    kwargs = dict(temperature=temperature, seed=seeds)
    probs = draft_probs if temperature > 0 else None
    if probs is not None:
        kwargs["draft_probs"] = probs
    want = cpp_verify_tree(logits, tokens, parents, **kwargs)
    depth = want.accepted_nodes.shape[1] - 1
    results = emulated_verify_tree(emulator, logits, tokens, parents, depth, temperature=temperature,
                                   draft_probs=probs, seed=seeds)
    vocab = logits.shape[-1]
    exact = exact_walks(emulator, logits, tokens, parents, temperature, probs, seeds, depth + 1)
    check_against_exact_walk(want, exact, vocab, "cpp")
    stats_temperature = temperature if temperature > 0 else 1.0
    expected = float64_reference(logits, temperature=stats_temperature)
    for memory, got in zip(RUNS, results):
        where = f"[{context} T={temperature} {memory}]"
        if temperature == 0:
            assert_same_walk(got, want, where)  # no draws: nothing to round differently
        else:
            check_against_exact_walk(got, exact, vocab, f"emulated CUDA {where}")
        assert_close_to_reference(got.stats, logits, temperature=stats_temperature, context=where, expected=expected)
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "multi_draft"])
def test_walk_matches_cpp(emulator, mode, vocab, dtype, generator):
    batch, nodes = 3, 9
    logits = random_logits((batch, nodes, vocab), generator, dtype, scale=2.0)
    tokens, parents = random_tree(batch, nodes, vocab, generator, logits)
    probs = torch.softmax(random_logits((batch, nodes, vocab), generator, scale=1.5), -1).to(dtype)
    temperature = 0.0 if mode == "greedy" else 0.9
    compare_with_cpp(emulator, logits, tokens, parents, temperature=temperature,
                     draft_probs=probs if mode == "multi_draft" else None, context=f"{mode} V={vocab} {dtype}")


@pytest.mark.parametrize("vocab", [3, 4096, 4097, 12289])
def test_sampling_follows_the_slices_of_every_row(emulator, vocab, generator):
    # Many seeds on a flat row (every token equally likely): the sampled token lands in every slice
    # of the statistics pass, and in every part of a single-slice row.
    batch = 64
    logits = torch.zeros((batch, 2, vocab))
    logits[:, :, 0] = 0.5
    tokens = torch.zeros((batch, 2), dtype=torch.int64)
    parents = torch.tensor([-1, 0])
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    want = compare_with_cpp(emulator, logits, tokens, parents, temperature=1.0, seeds=seeds, context="flat rows")
    emitted = want.output_tokens[:, 0]
    assert emitted.unique().numel() > min(vocab, batch) // 2  # the draws spread out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_multi_draft_with_half_precision_draft_probs(emulator, dtype, generator):
    vocab = 700
    logits = random_logits((4, 6, vocab), generator, scale=1.0)
    tokens, parents = random_tree(4, 6, vocab, generator, logits)
    probs = torch.softmax(logits.float() * 0.8, -1).to(dtype)  # a draft close to the target
    probs[0, 0, :] = 0  # no draft mass at the root of row 0: every child is skipped
    compare_with_cpp(emulator, logits, tokens, parents, temperature=1.3, draft_probs=probs, context=str(dtype))


def test_hand_built_trees(emulator):
    tokens, parents = tree_from_paths([[5, 6, 7], [5, 2], [3]], root_token=0)
    assert tokens.tolist() == [0, 5, 6, 7, 2, 3] and parents.tolist() == [-1, 0, 1, 2, 1, 0]
    logits = torch.full((2, tokens.shape[0], 12), -3.0)
    for node, want in enumerate([5, 6, 9, 1, 4, 8]):  # the target's choice at each node
        logits[:, node, want] = 10.0
    logits[1, 2, 9] = math.nan  # row 1 stops at node 2 (its row is NaN): nothing emitted there
    for temperature in (0.0, 1e-3):
        want = compare_with_cpp(emulator, logits, tokens[None].expand(2, -1), parents, temperature=temperature,
                                context="hand-built")
        assert want.num_accepted.tolist() == [2, 2]
        assert want.output_tokens[0].tolist()[:3] == [5, 6, 9]
        assert want.output_tokens[1].tolist()[:3] == [5, 6, -1]


@pytest.mark.parametrize("mode", ["greedy", "sample", "multi_draft"])
def test_garbage_trees_stay_in_bounds(emulator, mode, generator):
    # validate=False: tokens outside [0, V), parents out of range or after their child, NaN and
    # negative draft probabilities. Memory-safe (the fenced buffers fault on any access outside),
    # never accepting an out-of-range token, and the same walk as the cpp backend.
    for trial in range(4):
        batch = int(torch.randint(1, 4, (), generator=generator))
        nodes = int(torch.randint(1, 10, (), generator=generator))
        vocab = int(torch.randint(1, 300, (), generator=generator))
        logits = random_logits((batch, nodes, vocab), generator)
        logits[torch.rand(logits.shape, generator=generator) < 0.05] = -1e20
        if trial == 0:
            logits[0, 0, 0] = math.nan
        tokens = torch.randint(-3, vocab + 40, (batch, nodes), generator=generator)
        tokens[torch.rand(tokens.shape, generator=generator) < 0.15] = 10**7
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = -(2**62)
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = 2**62
        parents = torch.randint(-5, nodes + 5, (batch, nodes), generator=generator)
        parents[:, 1::2] = torch.randint(0, max(nodes, 1), (batch, nodes // 2), generator=generator)
        probs = torch.rand((batch, nodes, vocab), generator=generator)
        probs[torch.rand(probs.shape, generator=generator) < 0.1] = math.nan
        probs[torch.rand(probs.shape, generator=generator) < 0.1] = -1.0
        temperature = 0.0 if mode == "greedy" else 0.8
        seeds = torch.randint(0, 2**62, (batch,), generator=generator)
        kwargs = dict(temperature=temperature, seed=seeds, validate=False)
        if mode == "multi_draft":
            kwargs["draft_probs"] = probs
        want = cpp_verify_tree(logits, tokens, parents, **kwargs)
        depth = want.accepted_nodes.shape[1] - 1
        draft = probs if mode == "multi_draft" else None
        exact = exact_walks(emulator, logits, tokens, parents, temperature, draft, seeds, depth + 1)
        for got in emulated_verify_tree(emulator, logits, tokens, parents, depth, temperature=temperature,
                                        draft_probs=draft, seed=seeds):
            check_walk_invariants(got, logits, tokens, parents)
            for b in range(batch):
                path = got.accepted_nodes[b, :int(got.num_accepted[b]) + 1].tolist()
                assert all(reachable(parents[b])[node] for node in path)
            if mode == "greedy":
                assert_same_walk(got, want, f"[garbage tree {trial}]")
            else:
                check_against_exact_walk(got, exact, vocab, f"emulated CUDA [garbage tree {trial} {mode}]")


def test_depth_smaller_than_the_tree_bounds_the_walk(emulator):
    # A direct caller may pass a depth below the tree's: the walk stops there, writing nothing past
    # the D + 1 columns (fenced: a write beyond faults).
    chain = [5, 6, 7, 3]
    logits = torch.zeros(2, 4, 8)
    for node, token in enumerate(chain):
        logits[:, node, token] = 50.0
    tokens = torch.tensor([[0] + chain[:3]] * 2)
    parents = torch.tensor([-1, 0, 1, 2])
    for depth in (0, 1, 2):
        for temperature in (0.0, 1.0):
            for got in emulated_verify_tree(emulator, logits, tokens, parents, depth, temperature=temperature):
                assert got.num_accepted.tolist() == [depth, depth]
                assert got.accepted_nodes.tolist() == [list(range(depth + 1))] * 2


def test_empty_batch_launches_nothing(emulator):
    emulator.counters(reset=True)
    for got in emulated_verify_tree(emulator, torch.zeros(0, 3, 10), torch.zeros(0, 3, dtype=torch.int64),
                                    torch.tensor([-1, 0, 1]), 2, temperature=0.5):
        assert got.num_accepted.shape == (0,) and got.stats.entropy.shape == (0, 3)
    assert emulator.counters()["launches"] == 0  # a grid of 0 CTAs would be a CUDA error
