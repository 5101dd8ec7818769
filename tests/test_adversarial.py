"""Hostile inputs on every backend: exact numerics at the edges of float32, memory-safe
``validate=False``, and argument checks that name the argument.

Every finite logit is a token, however negative (-1e20 and ``torch.finfo(torch.float32).min`` are
common masking idioms); magnitudes up to the float32 range, tiny and huge temperatures and
per-row temperature tensors must come out within the documented tolerance of the float64
reference, which is itself checked here against values known in closed form. The CUDA parameters
(marked ``cuda``) run the same cases on a GPU.
"""

import math

import numpy as np
import pytest
import torch

import fusedecode
from fusedecode import tree as fdtree
from fusedecode.reference import logit_stats_reference
from helpers import (assert_close_to_reference, check_walk_invariants, chi_square_pvalue, interpreted, reachable,
                     require_backend)
from support.adversarial_rows import LOGIT_CASES

F32 = torch.finfo(torch.float32)


def to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


# ------------------------------------------------------------------------------------------------
# logit_stats: adversarial rows against the float64 reference


def _randn(shape, generator, scale=3.0):
    return torch.randn(shape, generator=generator, dtype=torch.float64).mul(scale).float()


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_adversarial_rows(target, case, generator):
    device, backend = target
    args = LOGIT_CASES[case](generator)
    args = {k: to_device(v, device) for k, v in args.items()}
    logits = args.pop("logits")
    stats = fusedecode.logit_stats(logits, backend=backend, **args)
    assert_close_to_reference(stats, logits, context=f"[{case} backend={backend}]", **args)
    # Every row here has a finite entry and no NaN/+inf: nothing may come out NaN.
    for field in ("entropy", "varentropy", "self_certainty", "max_logprob", "topk_confidence"):
        assert not torch.isnan(getattr(stats, field)).any(), f"{field} has NaN [{case}]"


@pytest.mark.parametrize("case", ["far_-1e20", "far_finfo_min", "one_finite_among_finfo_min", "split_vocab",
                                  "large_offsets"])
def test_adversarial_rows_without_token_or_topk(target, case, generator):
    # The plain path (no token, no top-k) has its own kernels on some backends.
    device, backend = target
    logits = LOGIT_CASES[case](generator)["logits"].to(device)
    stats = fusedecode.logit_stats(logits, backend=backend)
    assert_close_to_reference(stats, logits, context=f"[{case} backend={backend}]")


def test_triton_launch_paths_on_adversarial_rows(generator):
    # One program per row, and vocabulary slices merged afterwards, on the same hostile rows.
    require_backend("cpu", "triton")
    from fusedecode.ops.logit_stats import run_triton

    for case in ("far_finfo_min", "near_float_max", "mixed_1e30", "temperature_extremes"):
        args = LOGIT_CASES[case](generator)
        logits = args["logits"]
        rows = logits.shape[0]
        temperature = args.get("temperature", 1.0)
        per_row = temperature.float() if isinstance(temperature, torch.Tensor) else None
        for splits in (1, 3):
            out = run_triton(logits.view(1, rows, -1), per_row, float(temperature) if per_row is None else 1.0,
                             args["token_ids"], args["topk"], splits=splits)
            stats = fusedecode.LogitStats(*(t.reshape(rows) for t in out))
            assert_close_to_reference(stats, logits, temperature=temperature, token_ids=args["token_ids"],
                                      topk=args["topk"], context=f"[{case} splits={splits}]")


# ------------------------------------------------------------------------------------------------
# The oracle itself: closed-form values the float64 reference (and every backend) must reproduce


def test_float_max_ties_closed_form(target):
    device, backend = target
    logits = torch.full((1, 100), 3.4e38, device=device)
    stats = fusedecode.logit_stats(logits, topk=5, token_ids=torch.tensor([7], device=device), backend=backend)
    assert stats.self_certainty.item() == pytest.approx(0.0, abs=1e-5)
    assert stats.topk_confidence.item() == pytest.approx(math.log(100), rel=1e-5)
    assert stats.entropy.item() == pytest.approx(math.log(100), rel=1e-5)
    assert stats.varentropy.item() == pytest.approx(0.0, abs=1e-5)
    assert stats.token_logprob.item() == pytest.approx(-math.log(100), rel=1e-5)
    assert stats.logsumexp.item() == pytest.approx(float(torch.tensor(3.4e38)), rel=1e-6)


def test_ties_1e30_closed_form(target):
    device, backend = target
    logits = torch.zeros((1, 50), device=device)
    logits[0, :3] = 1e30  # the rest is infinitely less likely
    stats = fusedecode.logit_stats(logits, topk=3, token_ids=torch.tensor([1], device=device), backend=backend,
                                   temperature=1e-6)
    assert stats.entropy.item() == pytest.approx(math.log(3), rel=1e-5)
    assert stats.token_logprob.item() == pytest.approx(-math.log(3), rel=1e-5)
    assert stats.topk_confidence.item() == pytest.approx(math.log(3), rel=1e-5)
    assert stats.max_logprob.item() == pytest.approx(-math.log(3), rel=1e-5)
    # self_certainty = log(3 / 50) + (1e30 - mean z) = 47/50 * 1e36 (z = x / 1e-6)
    assert stats.self_certainty.item() == pytest.approx(47 / 50 * 1e36, rel=1e-5)


def test_far_entries_weigh_exactly_nothing(target, generator):
    # A row with far entries has the statistics of its near part (plus the far entries' share of
    # the uniform mean in self_certainty): compare with the near part alone.
    device, backend = target
    near = _randn((1, 100), generator)
    for far in (-1e20, F32.min):
        logits = torch.cat([near, torch.full((1, 4900), far)], dim=1).to(device)
        stats = fusedecode.logit_stats(logits, backend=backend, topk=4)
        alone = logit_stats_reference(near.double(), topk=4, dtype=torch.float64)
        for field in ("logsumexp", "entropy", "varentropy", "max_logprob", "topk_confidence"):
            want = getattr(alone, field).item()
            assert getattr(stats, field).item() == pytest.approx(want, rel=1e-4, abs=1e-5), (field, far)


def test_offset_invariance(target, generator):
    # logit_stats(x + c) = logit_stats(x) for every field but logsumexp (which moves by c).
    device, backend = target
    base = torch.randn((3, 3000), generator=generator, dtype=torch.float64)
    for offset in (1e6, -1e6, 2.0**40):
        shifted = (base + offset).float()
        exact = shifted.double() - offset  # exact in float64: the same rows, small magnitudes
        want = logit_stats_reference(exact, token_ids=torch.tensor([0, 1, 2]), topk=5, dtype=torch.float64)
        got = fusedecode.logit_stats(shifted.to(device), token_ids=torch.tensor([0, 1, 2], device=device), topk=5,
                                     backend=backend)
        for field in ("entropy", "varentropy", "self_certainty", "max_logprob", "token_logprob", "topk_confidence"):
            torch.testing.assert_close(getattr(got, field).cpu().double(), getattr(want, field), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{field} at offset {offset}: {m}")
        torch.testing.assert_close(got.logsumexp.cpu().double(), want.logsumexp + offset, rtol=1e-6, atol=1e-5)


def test_tiny_temperature_known_values(target):
    # z = x / 1e-6 on [1, 1 + 1e-6, 1 - 1e-6, 0] (float32-rounded): a softmax over the rounded gaps.
    device, backend = target
    x = torch.tensor([[1.0, 1.0 + 1e-6, 1.0 - 1e-6, 0.0]])
    gaps = [(v - x[0, 1].item()) / 1e-6 for v in x[0].tolist()]
    log_s = math.log(math.fsum(math.exp(g) for g in gaps))
    stats = fusedecode.logit_stats(x.to(device), temperature=1e-6, token_ids=torch.tensor([0], device=device),
                                   topk=2, backend=backend)
    assert stats.token_logprob.item() == pytest.approx(gaps[0] - log_s, rel=1e-5)
    assert stats.max_logprob.item() == pytest.approx(-log_s, rel=1e-5)
    top2 = sorted(gaps, reverse=True)[:2]
    assert stats.topk_confidence.item() == pytest.approx(log_s - sum(top2) / 2, rel=1e-5)
    assert stats.self_certainty.item() == pytest.approx(log_s - sum(gaps) / 4 - math.log(4), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# verify_tree on hostile rows


def test_verify_tree_stats_on_adversarial_rows(target, generator):
    device, backend = target
    vocab = 9000  # three 4096-token slices in the statistics pass
    logits = _randn((2, 3, vocab), generator)
    logits[0, 0, 100:] = -1e20
    logits[0, 1, :8000] = F32.min
    logits[0, 2] += 1e6
    logits[1, 0] = F32.max
    logits[1, 1, ::2] = F32.min
    logits[1, 2] *= 1e30
    tokens = torch.tensor([[0, 5, 6], [0, 7, 8]])
    parents = torch.tensor([-1, 0, 1])
    for temperature, seed in ((0.0, None), (0.7, 3), (1e-30, 4)):
        out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), temperature=temperature,
                                     seed=seed, backend=backend)
        assert_close_to_reference(out.stats, logits, temperature=temperature if temperature > 0 else 1.0,
                                  context=f"[verify_tree T={temperature} backend={backend}]")
        check_walk_invariants(out, logits, tokens, parents)


def test_verify_tree_sampling_never_emits_far_tokens(target):
    # Far entries have probability exactly 0 at any temperature; at a tiny temperature sampling is
    # greedy, even where z = x / T overflows float32.
    device, backend = target
    vocab = 6000
    logits = torch.full((4, 2, vocab), F32.min)
    logits[:, :, 4321] = 3.0
    logits[:, :, 17] = 2.0
    logits[2, :, :3000] = -1e20
    logits[3] *= 0.5
    tokens = torch.tensor([[0, 4321]] * 4)
    parents = torch.tensor([-1, 0])
    for temperature in (1.0, 1e-6, 1e-30):
        out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), temperature=temperature,
                                     seed=torch.arange(4).to(device), backend=backend)
        emitted = out.output_tokens.cpu()
        assert torch.isin(emitted, torch.tensor([17, 4321, -1])).all(), (temperature, emitted)
        if temperature < 1e-5:
            assert out.num_accepted.tolist() == [1, 1, 1, 1]
            assert emitted.tolist() == [[4321, 4321]] * 4


def test_verify_tree_multi_draft_accepts_a_sure_token_at_extreme_magnitudes(target):
    # p(7) = 1 and q(7) = 1/2: the child drafting 7 is accepted with probability min(1, p/q) = 1,
    # also where z = x / T overflows float32 or x sits on a large offset.
    device, backend = target
    vocab = 300
    logits = torch.full((3, 2, vocab), F32.min)
    logits[0, :, 7] = 50.0
    logits[1] = torch.linspace(-10, 10, vocab) + 1e6
    logits[1, :, 7] = 1e6 + 50
    logits[2] = torch.linspace(-1e30, 1e30, vocab)
    logits[2, :, 7] = 5e31
    probs = torch.full((3, 2, vocab), 0.5 / (vocab - 1))
    probs[:, :, 7] = 0.5
    tokens = torch.tensor([[0, 7]] * 3)
    parents = torch.tensor([-1, 0])
    out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), temperature=1e-8,
                                 draft_probs=probs.to(device), seed=torch.arange(3).to(device), backend=backend)
    assert out.num_accepted.tolist() == [1, 1, 1]
    assert out.output_tokens.tolist() == [[7, 7]] * 3


@pytest.mark.parametrize("offset", [0.0, 1e7])
def test_verify_tree_multi_draft_lossless_at_large_offset(target, offset):
    # SpecInfer's acceptance ratio p(x) / q(x) from logits at 1e7 (float32 spacing 1): computed as
    # exp(z_x - logsumexp) it is off by up to exp(0.5) (logsumexp rounds to an integer there); the
    # first emitted token must still follow p = softmax(logits / T) of the float32 logits exactly.
    device, backend = target
    batch = 300 if interpreted(target) else 4000
    vocab, temperature = 5, 1.0
    row = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]) + offset
    logits = row.expand(batch, 3, vocab).contiguous()
    q = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    probs = q.expand(batch, 3, vocab).contiguous()
    generator = torch.Generator().manual_seed(17)
    tokens = torch.zeros((batch, 3), dtype=torch.int64)
    tokens[:, 1:] = torch.multinomial(q, batch * 2, replacement=True, generator=generator).view(batch, 2)
    parents = torch.tensor([-1, 0, 0])
    out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), temperature=temperature,
                                 draft_probs=probs.to(device), seed=torch.arange(batch).to(device) * 7 + 1,
                                 backend=backend)
    first = out.output_tokens[:, 0].cpu()
    p = torch.softmax((row.double() - row.double().max()) / temperature, -1)
    assert chi_square_pvalue(torch.bincount(first, minlength=vocab), p) > 1e-3


def test_verify_tree_empty_batch(target):
    device, backend = target
    for temperature, probs in ((0.0, None), (0.8, None), (0.8, torch.zeros(0, 3, 10))):
        out = fusedecode.verify_tree(torch.zeros(0, 3, 10, device=device), torch.zeros(0, 3, dtype=torch.int64,
                                                                                       device=device),
                                     torch.tensor([-1, 0, 1], device=device), temperature=temperature,
                                     draft_probs=to_device(probs, device), backend=backend)
        assert out.num_accepted.shape == (0,)
        assert out.accepted_nodes.shape[0] == 0 and out.output_tokens.shape[0] == 0
        assert out.stats.entropy.shape == (0, 3) and out.stats.argmax.shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# validate=False: invalid trees and tokens are memory-safe and never accepted


@pytest.mark.parametrize("mode", ["greedy", "sample", "multi_draft"])
def test_validate_false_fuzz_never_crashes(target, mode, generator):
    device, backend = target
    trials = 3 if backend == "triton" and device == "cpu" else 12
    for _ in range(trials):
        batch = int(torch.randint(1, 5, (), generator=generator))
        nodes = int(torch.randint(1, 12, (), generator=generator))
        vocab = int(torch.randint(1, 300, (), generator=generator))
        logits = _randn((batch, nodes, vocab), generator)
        logits[torch.rand(logits.shape, generator=generator) < 0.05] = -1e20
        if torch.rand((), generator=generator) < 0.3:
            logits[0, 0, 0] = math.nan
        # Tokens mostly just outside [0, V) (the reads the walk must never make), a few far out.
        tokens = torch.randint(-3, vocab + 40, (batch, nodes), generator=generator)
        tokens[torch.rand(tokens.shape, generator=generator) < 0.15] = 10**7
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = -(2**62)
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = 2**62
        # Make the target want some out-of-range tokens' in-range neighbours, and some valid ones.
        parents = torch.randint(-5, nodes + 5, (batch, nodes), generator=generator)
        parents[:, 1::2] = torch.randint(0, max(nodes, 1), (batch, nodes // 2), generator=generator)
        if torch.rand((), generator=generator) < 0.5:
            parents = parents[0]
        kwargs = dict(temperature=0.0 if mode == "greedy" else 0.8, seed=int(torch.randint(0, 2**62, (),
                                                                                          generator=generator)))
        if mode == "multi_draft":
            probs = torch.rand((batch, nodes, vocab), generator=generator)
            probs[torch.rand(probs.shape, generator=generator) < 0.1] = math.nan
            probs[torch.rand(probs.shape, generator=generator) < 0.1] = -1.0
            kwargs["draft_probs"] = probs.to(device)
        out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), validate=False,
                                     backend=backend, **kwargs)
        check_walk_invariants(out, logits, tokens, parents)
        for b in range(batch):
            path = out.accepted_nodes[b, :int(out.num_accepted[b]) + 1].tolist()
            ok = reachable(parents if parents.dim() == 1 else parents[b])
            assert all(ok[node] for node in path)


@pytest.mark.parametrize("mode", ["greedy", "sample", "multi_draft"])
def test_validate_false_out_of_range_tokens_are_never_accepted(target, mode):
    # The target wants token 3 everywhere; the drafts are 3 + V (and 3 - V): in range they would be
    # accepted (the same token modulo V), so a walk that reads past the row would show it.
    device, backend = target
    vocab = 40
    logits = torch.full((2, 4, vocab), -5.0)
    logits[:, :, 3] = 20.0
    probs = torch.full((2, 4, vocab), 1.0 / vocab)
    tokens = torch.tensor([[0, 3 + vocab, 3 - vocab, 10**7], [0, 3 + 10**7, 3 + vocab, 3]])
    parents = torch.tensor([-1, 0, 0, 0])
    kwargs = dict(temperature=0.0 if mode == "greedy" else 0.5, seed=5)
    if mode == "multi_draft":
        kwargs["draft_probs"] = probs.to(device)
    out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), validate=False,
                                 backend=backend, **kwargs)
    check_walk_invariants(out, logits, tokens, parents)
    assert out.num_accepted.tolist() == [0, 1]
    assert out.output_tokens[0, 0].item() == 3 and out.accepted_nodes[1, 1].item() == 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_custom_ops_bound_the_walk_by_the_depth_they_are_given(target, temperature):
    # verify_tree sizes its outputs from the tree's depth; a direct caller of the custom op may pass
    # a smaller one. The walk must then stop at that depth (num_accepted <= depth, nothing written
    # past the D + 1 columns), on a chain whose every token is the target's sure choice.
    from fusedecode.ops._outputs import by_name
    from fusedecode.ops.verify_tree import OUTPUTS

    device, backend = target
    if backend == "torch":
        pytest.skip("the torch backend is not a custom op")
    chain = [5, 6, 7, 3]  # node i drafts chain[i - 1]; the target's choice at node i is chain[i]
    logits = torch.zeros(2, 4, 8)
    for node, token in enumerate(chain):
        logits[:, node, token] = 50.0
    tokens = torch.tensor([[0] + chain[:3]] * 2)
    parents = torch.tensor([[-1, 0, 1, 2]] * 2)
    op = torch.ops.fusedecode.verify_tree_triton if backend == "triton" else torch.ops.fusedecode.verify_tree
    for depth in (1, 2):
        fields = by_name(OUTPUTS, op(logits.to(device), tokens.to(device), parents.to(device), temperature, None,
                                     torch.zeros(2, dtype=torch.int64, device=device), depth))
        assert fields["num_accepted"].tolist() == [depth, depth]
        assert fields["accepted_nodes"].shape == (2, depth + 1)
        assert fields["accepted_nodes"].tolist() == [list(range(depth + 1))] * 2
        assert fields["output_tokens"][:, :depth].tolist() == [chain[:depth]] * 2


def test_custom_ops_with_no_nodes_write_nothing(target):
    # The public function rejects N = 0, the custom ops do not: with no node row the statistics pass
    # writes nothing, so the walk must not run (it would read the [B, 0] statistics) and the
    # outputs keep their fills.
    device, backend = target
    if backend == "torch":
        pytest.skip("the torch backend is not a custom op")
    op = torch.ops.fusedecode.verify_tree_triton if backend == "triton" else torch.ops.fusedecode.verify_tree
    empty = torch.zeros((2, 0), dtype=torch.int64, device=device)
    for temperature in (0.0, 0.5):
        fields = op(torch.zeros((2, 0, 5), device=device), empty, empty, temperature, None,
                    torch.zeros(2, dtype=torch.int64, device=device), 0)
        assert fields[0].tolist() == [0, 0]
        assert fields[1].tolist() == [[-1], [-1]] and fields[2].tolist() == [[-1], [-1]]


@pytest.mark.parametrize("parents", [[-1, 0, 100, 0], [-1, 2, 1, 0], [5, -7, 0, 1], [-1, 1, 2, 3], [-1, -1, 0, 2]])
def test_validate_false_invalid_parents(target, parents):
    device, backend = target
    vocab = 16
    logits = torch.full((1, 4, vocab), -5.0)
    logits[0, :, 9] = 10.0
    tokens = torch.tensor([[0, 9, 9, 9]])
    parents = torch.tensor(parents)
    for temperature in (0.0, 0.6):
        out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), validate=False,
                                     temperature=temperature, seed=1, backend=backend)
        check_walk_invariants(out, logits, tokens, parents)
        ok = reachable(parents)
        path = out.accepted_nodes[0, :int(out.num_accepted[0]) + 1].tolist()
        assert all(ok[node] for node in path)
        # Greedy follows the first reachable child drafting 9 at every step.
        if temperature == 0.0:
            expected, node = [0], 0
            while True:
                nxt = next((c for c in range(node + 1, 4) if ok[c] and int(parents[c]) == node), None)
                if nxt is None:
                    break
                expected.append(nxt)
                node = nxt
            assert path == expected


# ------------------------------------------------------------------------------------------------
# Argument checks: ValueError / TypeError naming the argument


@pytest.mark.parametrize("temperature", [1e-50, 1e-39, 2.9e-39, 1e39, 3.5e38, -0.0, math.inf, -1e-30])
def test_logit_stats_temperature_outside_float32(temperature):
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        fusedecode.logit_stats(logits, temperature=temperature, backend="torch")
    for dtype in (torch.float64, torch.float32):
        rows = torch.tensor([1.0, temperature], dtype=dtype)
        with pytest.raises(ValueError, match="temperature"):
            fusedecode.logit_stats(logits, temperature=rows, backend="torch")


def test_unchecked_per_row_temperatures_give_nan_rows(target, generator):
    # Per-row temperatures are only read by the validation where that costs no synchronisation
    # (not on a GPU, not while tracing or capturing). There, a row whose temperature breaks the
    # float32 rule must come out NaN (argmax -1) from the kernels and from the reference alike,
    # and the other rows must be untouched. The custom ops are called directly, as the public
    # function does after a validation that could not read the values.
    from fusedecode.ops.logit_stats import OUTPUTS
    from fusedecode.ops._outputs import by_name

    device, backend = target
    logits = _randn((7, 300), generator).to(device)
    temperature = torch.tensor([0.7, 0.0, -1.0, math.nan, math.inf, 2e-39, 1.5], dtype=torch.float32, device=device)
    invalid = torch.tensor([False, True, True, True, True, True, False])
    if backend == "torch":
        stats = logit_stats_reference(logits, temperature, topk=3)
    else:
        op = torch.ops.fusedecode.logit_stats_triton if backend == "triton" else torch.ops.fusedecode.logit_stats
        fields = by_name(OUTPUTS, op(logits[None], temperature, 1.0, None, 3), {"token_ids": False, "topk": True})
        stats = fusedecode.LogitStats(**fields)
    expected = logit_stats_reference(logits.cpu().double(), temperature.cpu(), topk=3, dtype=torch.float64)
    for name in ("logsumexp", "entropy", "varentropy", "self_certainty", "max_logprob", "topk_confidence"):
        got, want = getattr(stats, name).cpu(), getattr(expected, name)
        assert torch.isnan(want).equal(invalid), name
        assert torch.isnan(got).equal(invalid), f"{backend} {name}: {got}"
        torch.testing.assert_close(got[~invalid].double(), want[~invalid], rtol=1e-5, atol=1e-5)
    assert stats.argmax.cpu()[invalid].eq(-1).all() and expected.argmax[invalid].eq(-1).all()
    assert stats.argmax.cpu()[~invalid].equal(logits.cpu().argmax(-1)[~invalid])


@pytest.mark.parametrize("temperature", [3e-39, 3.5e-39, 1e-38, 3e38, 3.4e38])
def test_logit_stats_temperature_edges_accepted(target, temperature, generator):
    device, backend = target
    logits = _randn((2, 300), generator).to(device)
    for t in (temperature, torch.full((2,), temperature, dtype=torch.float64, device=device)):
        stats = fusedecode.logit_stats(logits, temperature=t, backend=backend, topk=3)
        assert_close_to_reference(stats, logits, temperature=t, topk=3, context=f"[T={temperature}]")


@pytest.mark.parametrize("temperature", [1e-50, 1e-39, 1e39, -1.0, math.nan])
def test_verify_tree_temperature_outside_float32(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fusedecode.verify_tree(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([-1, 0]),
                               temperature=temperature, backend="torch")


def test_numpy_scalar_temperatures():
    # NumPy floats (np.float32 is not a Python float) are numbers like any other; bools are not.
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    want = fusedecode.logit_stats(logits, temperature=0.5, backend="torch")
    got = fusedecode.logit_stats(logits, temperature=np.float32(0.5), backend="torch")
    torch.testing.assert_close(got.entropy, want.entropy)
    tree = (torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([-1, 0]))
    fusedecode.verify_tree(*tree, temperature=np.float32(0.5), seed=1, backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        fusedecode.logit_stats(logits, temperature=np.float32(1e-45), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        fusedecode.verify_tree(*tree, temperature=np.float64(1e-50), backend="torch")
    with pytest.raises(TypeError, match="temperature"):
        fusedecode.logit_stats(logits, temperature=np.True_, backend="torch")


@pytest.mark.parametrize("seed", [np.int64(3), np.int32(3), np.uint64(3), np.uint8(3), 3])
def test_numpy_integer_seeds(target, seed):
    device, backend = target
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).to(device)
    tokens = torch.zeros(2, 3, dtype=torch.int64, device=device)
    parents = torch.tensor([-1, 0, 0], device=device)
    got = fusedecode.verify_tree(logits, tokens, parents, temperature=1.0, seed=seed, backend=backend)
    want = fusedecode.verify_tree(logits, tokens, parents, temperature=1.0, seed=3, backend=backend)
    assert torch.equal(got.output_tokens, want.output_tokens)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, np.uint64(2**63), np.int64(-5), True, 1.0, "3",
                                  np.float64(3.0)])
def test_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        fusedecode.verify_tree(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([-1, 0]),
                               temperature=1.0, seed=seed, backend="torch")


def test_largest_seed_accepted():
    out = fusedecode.verify_tree(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([-1, 0]),
                                 temperature=1.0, seed=2**63 - 1, backend="torch")
    assert out.num_accepted.shape == (1,)


INVALID_TREES = {
    "cycle": [-1, 2, 1],
    "self_parent": [-1, 1],
    "parent_after_child": [-1, 2, 0],
    "root_not_minus_one": [0, 0],
    "parent_out_of_range": [-1, 0, 100],
    "negative_parent": [-1, -3, 0],
    "second_root": [-1, 0, -1],
}
TREE_HELPERS = {
    "tree_attention_mask": fdtree.tree_attention_mask,
    "tree_position_ids": lambda p: fdtree.tree_position_ids(p, start=3),
    "tree_depths": fdtree.tree_depths,
    "tree_to_next_sibling": fdtree.tree_to_next_sibling,
}


@pytest.mark.parametrize("helper", list(TREE_HELPERS))
@pytest.mark.parametrize("tree", list(INVALID_TREES))
def test_tree_helpers_refuse_invalid_trees(helper, tree):
    parents = INVALID_TREES[tree]
    with pytest.raises(ValueError, match="parents"):
        TREE_HELPERS[helper](torch.tensor(parents))
    # One bad row in a batch of trees is enough.
    good = [-1] + [0] * (len(parents) - 1)
    with pytest.raises(ValueError, match="parents"):
        TREE_HELPERS[helper](torch.tensor([good, parents]))


@pytest.mark.parametrize("helper", list(TREE_HELPERS))
def test_tree_helpers_accept_valid_trees(helper):
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    TREE_HELPERS[helper](parents)
    TREE_HELPERS[helper](torch.stack([parents, torch.tensor([-1, 0, 1, 2, 3, 4])]))
    TREE_HELPERS[helper](torch.tensor([-1]))
