"""Goodness-of-fit tests with a stated power, for the losslessness tests of verify_tree and
tree_speculative.

The test: Pearson's chi-square of observed counts over k cells against the claimed distribution p,
rejected at false-alarm rate ``ALPHA`` (the p-value is the upper tail of the chi-square law with
k - 1 degrees of freedom).

How many draws: the tests must see a ``TV_ERROR`` = 2% total-variation error in the emitted
distribution with probability >= ``POWER`` = 0.99. If the sampler's true distribution is p' with
TV(p, p') = eps, Pearson's statistic over n draws is asymptotically noncentral chi-square with
k - 1 degrees of freedom and noncentrality

    lambda = n * sum_i (p'_i - p_i)^2 / p_i.

The smallest lambda over every p' at TV distance eps (the worst-case error) is bounded below for
any p: let d = p' - p, A the cells where d > 0, B the others; sum_A d = sum_B |d| = eps. By
Cauchy-Schwarz sum_A d_i^2 / p_i >= eps^2 / P(A), and the same for B, so

    lambda >= n * eps^2 * (1 / P(A) + 1 / P(B)) >= n * eps^2 * 4 / (P(A) + P(B)) >= 4 n eps^2,

with equality when p splits into two halves (as p = [.5, .3, .15, .05] does: {.5} and the rest).
An error that puts mass on a cell with p_i = 0 is seen outright (any draw there fails the test).
So with lambda_min = 4 n eps^2, the power against every 2%-TV error is at least

    power = P(noncentral chi2(k - 1, lambda_min) > chi2_{k-1}^{-1}(1 - ALPHA)),

computed here exactly (Poisson mixture of central chi-square tails). At ALPHA = 1e-3 the critical
values are 16.27 (4 cells, 3 degrees of freedom) and 37.70 (16 cells); power >= 0.99 needs
lambda >= 37.93, n >= 23,708 draws for 4 cells (the first token over a 4-token vocabulary) and
lambda >= 55.16, n >= 34,476 for 16 cells (the pair of the first two tokens). ``required_draws`` finds the smallest n and
``assert_powerful`` checks a test's n against it (and that no cell is so rare that the chi-square
approximation fails: every expected count >= 5, so no cells are pooled and the bound holds as
stated). The approximation is checked by simulation in ``tests/ops/verify_tree/test_power.py``.

Fixed seeds make the tests deterministic: a correct sampler passes with these seeds, a sampler
with a 2% error fails with probability >= 0.99 over the choice of seeds.
"""

import math

import torch

ALPHA = 1e-3  # false-alarm rate of one goodness-of-fit test
TV_ERROR = 0.02  # the total-variation error the tests must see
POWER = 0.99  # ... with this probability
MIN_EXPECTED = 5.0  # the chi-square approximation's usual validity condition


def chi_square_tail(statistic, dof):
    """P(chi2(dof) > statistic)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def chi_square_critical(dof, alpha=ALPHA):
    """The statistic above which the test rejects: chi2_{dof}^{-1}(1 - alpha), by bisection."""
    low, high = 0.0, dof + 100.0 * math.sqrt(dof) + 100.0
    for _ in range(200):
        middle = (low + high) / 2
        if chi_square_tail(middle, dof) > alpha:
            low = middle
        else:
            high = middle
    return high


def noncentral_power(dof, noncentrality, alpha=ALPHA):
    """P(noncentral chi2(dof, noncentrality) > critical value): the power of the test."""
    critical = chi_square_critical(dof, alpha)
    half = noncentrality / 2.0
    power = 0.0
    for j in range(int(half + 20 * math.sqrt(half + 1) + 50)):
        weight = math.exp(-half + j * math.log(half) - math.lgamma(j + 1)) if half > 0 else float(j == 0)
        power += weight * chi_square_tail(critical, dof + 2 * j)
    return power


def worst_case_noncentrality(draws, tv=TV_ERROR):
    """The smallest noncentrality of Pearson's statistic over every distribution at total-variation
    distance ``tv`` from the claimed one (the bound of the module docstring)."""
    return 4.0 * draws * tv * tv


def required_draws(cells, tv=TV_ERROR, power=POWER, alpha=ALPHA):
    """The smallest number of draws for which a test over ``cells`` cells has at least ``power``
    against every ``tv`` error."""
    low, high = 1, 1
    while noncentral_power(cells - 1, worst_case_noncentrality(high, tv), alpha) < power:
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if noncentral_power(cells - 1, worst_case_noncentrality(middle, tv), alpha) >= power:
            high = middle
        else:
            low = middle + 1
    return high


def assert_powerful(probabilities, draws, tv=TV_ERROR, power=POWER, alpha=ALPHA):
    """Fails unless a test of ``draws`` draws against ``probabilities`` has the stated power: no cell
    of positive probability too rare for the approximation, and the worst-case power >= ``power``."""
    positive = probabilities[probabilities > 0].double()
    assert float(positive.min()) * draws >= MIN_EXPECTED, "a cell is too rare for the chi-square approximation"
    achieved = noncentral_power(positive.numel() - 1, worst_case_noncentrality(draws, tv), alpha)
    assert achieved >= power, (f"{draws} draws over {positive.numel()} cells give power {achieved:.4f} < {power} "
                               f"against a {tv:.0%} TV error; {required_draws(positive.numel(), tv, power, alpha)} "
                               f"needed")
    return achieved


def detectable_tv(cells, draws, power=POWER, alpha=ALPHA):
    """The total-variation error that ``draws`` draws over ``cells`` cells see with ``power`` (the
    reduced sizes of the Triton interpreter report this)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if noncentral_power(cells - 1, worst_case_noncentrality(draws, middle), alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def pooled_cells(counts, expected):
    """Cells merged, rarest first, until each expects >= MIN_EXPECTED draws (for the small samples
    of the Triton interpreter; the powered tests never need it)."""
    order = torch.argsort(expected)
    pooled_o, pooled_e, acc_o, acc_e = [], [], 0.0, 0.0
    for index in order.tolist():
        acc_o, acc_e = acc_o + float(counts[index]), acc_e + float(expected[index])
        if acc_e >= MIN_EXPECTED:
            pooled_o.append(acc_o)
            pooled_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        if pooled_e:
            pooled_o[-1] += acc_o
            pooled_e[-1] += acc_e
        else:
            pooled_o, pooled_e = [acc_o], [acc_e]
    return torch.tensor(pooled_o, dtype=torch.float64), torch.tensor(pooled_e, dtype=torch.float64)


def chi_square_p_value(counts, probabilities, pool=False):
    """Pearson's test of ``counts`` against ``probabilities`` (same length). Any count in a cell of
    probability 0 gives p-value 0. No pooling unless asked: the powered tests' cells all expect
    >= 5 draws."""
    counts, probabilities = counts.double().cpu(), probabilities.double().cpu()
    assert counts.shape == probabilities.shape
    if float(counts[probabilities <= 0].sum()) > 0:
        return 0.0
    keep = probabilities > 0
    observed, expected = counts[keep], probabilities[keep] * counts.sum()
    if pool:
        observed, expected = pooled_cells(observed, expected)
    if expected.numel() < 2:
        return 1.0
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return chi_square_tail(statistic, expected.numel() - 1)


def assert_distributed_as(samples, probabilities, context="", pool=False):
    """``samples`` (int tensor of outcomes 0..k-1) pass Pearson's test against ``probabilities`` [k]."""
    counts = torch.bincount(samples.reshape(-1).cpu(), minlength=probabilities.numel())
    assert counts.numel() == probabilities.numel(), f"outcome out of range {context}"
    p_value = chi_square_p_value(counts, probabilities, pool)
    expected = (probabilities.double() * samples.numel()).round().long()
    assert p_value > ALPHA, f"p-value {p_value:.3g} {context}\ncounts   {counts.tolist()}\nexpected {expected.tolist()}"
    return p_value
