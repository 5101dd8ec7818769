"""verify_tree's sampling is lossless, tested with the power to see a 2% total-variation error
(tests/support/distribution.py has the calculation): the first emitted token, and the pair of the first two,
follow the target, for target-only and multi-draft (SpecInfer) verification on every backend.

The draft disagrees strongly with the target (q is p reversed), so a wrong residual, a draft row of
the wrong node or a correlated random stream moves the output distribution far more than 2%.
"""

import pytest
import torch

import fusedecode
from support.distribution import (ALPHA, POWER, TV_ERROR, assert_distributed_as, assert_powerful, chi_square_critical,
                                  chi_square_p_value, detectable_tv, noncentral_power, required_draws)

VOCAB = 4
TARGET = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)  # splits into halves: the worst case
DRAFT = TARGET.flip(0)
CHILDREN = (3, 2)  # the root drafts 3 children i.i.d. from q_root, each of them 2 from its own q
DRAWS = 36_000  # >= required_draws(16): the pair of the first two tokens has 16 cells
INTERPRETED_DRAWS = 150  # the Triton interpreter runs every program in Python: about 40 s a mode


def target_after(token):
    """The target's distribution after the root (token < 0) or after a first token ``token``:
    the target rolled by the token, so that the second token depends on the first."""
    return TARGET if token < 0 else TARGET.roll(int(token) + 1)


def draft_after(token):
    return DRAFT if token < 0 else DRAFT.roll(int(token) + 1)


def pair_distribution():
    """P(first = a, second = b) at index 4a + b."""
    return torch.stack([TARGET[a] * target_after(a) for a in range(VOCAB)]).reshape(-1)


def drafted_trees(rows, generator):
    """``rows`` trees drafted i.i.d. as SpecInfer assumes: tokens, parents, target logits and draft
    probabilities (row i: the distribution after the path to node i)."""
    k1, k2 = CHILDREN
    nodes = 1 + k1 + k1 * k2
    parents = torch.tensor([-1] + [0] * k1 + [1 + i // k2 for i in range(k1 * k2)])
    tokens = torch.zeros((rows, nodes), dtype=torch.int64)
    tokens[:, 1:1 + k1] = torch.multinomial(DRAFT, rows * k1, replacement=True, generator=generator).view(rows, k1)
    for i in range(k1):  # grandchildren of child i, drawn from q after child i's token
        first = tokens[:, 1 + i]
        q_rows = torch.stack([draft_after(t) for t in range(VOCAB)])[first]
        tokens[:, 1 + k1 + i * k2:1 + k1 + (i + 1) * k2] = torch.multinomial(q_rows, k2, replacement=True,
                                                                              generator=generator)
    # Depth 0 and 1 rows as above; the leaves' rows only give bonus tokens (any distribution).
    depth_one = torch.zeros((rows, nodes), dtype=torch.int64) - 1
    depth_one[:, 1:1 + k1] = tokens[:, 1:1 + k1]
    target_rows = torch.stack([target_after(t) for t in range(-1, VOCAB)])  # index token + 1
    draft_rows = torch.stack([draft_after(t) for t in range(-1, VOCAB)])
    logits = target_rows.log()[depth_one + 1].float()
    probs = draft_rows[depth_one + 1].float()
    return tokens, parents, logits, probs


def first_two_tokens(out, generator):
    """The first two tokens of the generated sequence: the second is sampled from the target (as the
    next step would) where verification accepted nothing."""
    first = out.output_tokens[:, 0].cpu()
    second = out.output_tokens[:, 1].cpu().clone()
    stopped = out.num_accepted.cpu() == 0
    following = torch.stack([target_after(t) for t in range(VOCAB)])[first[stopped]]
    second[stopped] = torch.multinomial(following, 1, generator=generator)[:, 0]
    return first, second


def test_the_sizes_have_the_stated_power():
    assert DRAWS >= required_draws(16) >= required_draws(4)
    assert_powerful(pair_distribution(), DRAWS)
    assert_powerful(TARGET, DRAWS)


def test_the_power_calculation_by_simulation():
    """Pearson's test rejects the worst-case 2%-TV error (mass moved from one half of p to the other,
    in proportion) at least POWER of the time at DRAWS draws, and the truth at most ~ALPHA."""
    pairs = pair_distribution()
    order = torch.argsort(pairs, descending=True)
    half = torch.zeros_like(pairs, dtype=torch.bool)
    running = 0.0
    for index in order.tolist():  # a split of the 16 cells into two sets of mass ~1/2
        if running + float(pairs[index]) <= 0.5 + 1e-12:
            half[index] = True
            running += float(pairs[index])
    mass = float(pairs[half].sum())
    wrong = pairs.clone()
    wrong[half] += TV_ERROR * pairs[half] / mass
    wrong[~half] -= TV_ERROR * pairs[~half] / (1 - mass)
    generator = torch.Generator().manual_seed(0)
    trials = 300
    rejected = {}
    for name, truth in (("right", pairs), ("wrong", wrong)):
        # DRAWS draws per trial by inverse CDF, then each trial's counts: one bincount for all trials.
        cells = torch.searchsorted(truth.cumsum(0), torch.rand(trials, DRAWS, generator=generator, dtype=torch.float64))
        counts = torch.bincount((cells.clamp(max=15) + 16 * torch.arange(trials)[:, None]).reshape(-1),
                                minlength=16 * trials).view(trials, 16)
        rejected[name] = sum(chi_square_p_value(row, pairs) <= ALPHA for row in counts)
    predicted = noncentral_power(15, DRAWS * float(((wrong - pairs) ** 2 / pairs).sum()))
    assert predicted >= POWER
    assert rejected["wrong"] >= trials * 0.97, (rejected, predicted)  # 0.99 less simulation noise
    assert rejected["right"] <= 2, rejected
    assert chi_square_critical(15) > 15  # sanity of the inverse


@pytest.mark.parametrize("mode", ["target_only", "multi_draft"])
def test_first_and_second_token_follow_the_target(target, mode):
    device, backend = target
    interpreted = (device, backend) == ("cpu", "triton")
    rows = INTERPRETED_DRAWS if interpreted else DRAWS
    if not interpreted:
        assert_powerful(pair_distribution(), rows)
    generator = torch.Generator().manual_seed(20261201)
    tokens, parents, logits, probs = drafted_trees(rows, generator)
    seeds = torch.arange(rows, dtype=torch.int64) * 1_000_003 + 12345
    kwargs = dict(temperature=1.0, seed=seeds.to(device))
    if mode == "multi_draft":
        kwargs["draft_probs"] = probs.to(device)
    out = fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device), backend=backend,
                                 **kwargs)
    first, second = first_two_tokens(out, generator)
    context = f"[{backend} on {device}, {mode}, {rows} draws"
    context += f", sees a {detectable_tv(16, rows):.1%} TV error]" if interpreted else "]"
    assert_distributed_as(first, TARGET, "first token " + context, pool=interpreted)
    assert_distributed_as(first * VOCAB + second, pair_distribution(), "first two tokens " + context, pool=interpreted)
    # The walk goes deep often enough that the second token is often verify_tree's own (~1/3 of
    # the rows target-only, ~3/4 multi-draft).
    assert float((out.num_accepted > 0).double().mean()) > 0.2
