"""verify_tree's walk in float64, keyed by the kernels' own Philox draws: the exact decisions that the
cpp and CUDA walks (csrc/include/fusedecode/tree_walk.h) approximate in float32.

Two backends given the same draws can only disagree where a draw lands within float32 rounding of a
decision's threshold: a sampled token's cumulative-probability boundary (float32 sums of up to V
weights, the statistics pass's slice masses), or an acceptance ratio ``p'(x) / q(x)``. The walk here
reports, besides its result, the smallest distance between a draw and its threshold along the path
(``margin``), so a test can require a backend to equal this walk exactly except on rows whose path
passed that close to a threshold.
"""

import math
from typing import List, NamedTuple

import torch

SAMPLE_DRAW, ACCEPT_DRAW = 0, 1  # RandomPurpose of philox.h


class ExactWalk(NamedTuple):
    accepted_nodes: List[int]  # 0, then the accepted nodes
    output_tokens: List[int]   # the accepted tokens, then the emitted one (absent for a NaN row)
    margin: float              # smallest |draw - threshold| met on the way (inf when greedy)


def _inverse_cdf(weights, u):
    """The first token whose cumulative normalised weight reaches u, and the distance from u to the
    edges of that token's interval."""
    total = float(weights.sum())
    cumulative = torch.cumsum(weights, 0) / total
    hits = torch.nonzero((cumulative >= u) & (weights > 0))
    positive = torch.nonzero(weights > 0)
    token = int(hits[0]) if hits.numel() else int(positive[-1])
    upper = float(cumulative[token])
    lower = upper - float(weights[token]) / total
    return token, min(abs(u - lower), abs(upper - u))


def _children(parents, node):
    return [c for c in range(node + 1, len(parents)) if int(parents[c]) == node]


def exact_walk(logits, tokens, parents, temperature, draft_probs, seed, row, width, uniform):
    """The walk of batch row ``row``: ``logits`` ``[N, V]``, ``tokens`` and ``parents`` ``[N]``,
    ``draft_probs`` ``[N, V]`` or None, ``width`` = D + 1, ``uniform(seed, row, node, purpose)`` the
    kernels' draw."""
    logits = logits.double()
    accepted, emitted, margin = [0], [], math.inf
    node = 0
    while True:
        x = logits[node]
        if torch.isnan(x).any() or (x == math.inf).any() or not torch.isfinite(x).any():
            break  # an invalid row: the walk stops, nothing emitted
        child, choice = None, None
        if temperature == 0:
            choice = int(torch.argmax(x))
            child = next((c for c in _children(parents, node) if int(tokens[c]) == choice), None)
        else:
            p = torch.softmax((x - x.max()) / temperature, 0)
            if draft_probs is None:
                choice, m = _inverse_cdf(p, uniform(seed, row, node, SAMPLE_DRAW))
                margin = min(margin, m)
                child = next((c for c in _children(parents, node) if int(tokens[c]) == choice), None)
            else:
                child, choice, m = _specinfer(p, draft_probs[node].double(), tokens, parents, node, seed, row,
                                              uniform)
                margin = min(margin, m)
        if child is None or len(accepted) >= width:
            if child is None:
                emitted.append(choice)
            break
        emitted.append(int(tokens[child]))
        accepted.append(child)
        node = child
    return ExactWalk(accepted, emitted, margin)


def _specinfer(p, q, tokens, parents, node, seed, row, uniform):
    """Children tried in order (the closed form of tree_walk.h: after rejections the residual is
    max(p - c q, 0) / mass); returns (accepted child or None, emitted token or None, margin)."""
    vocab = p.shape[0]
    c, mass, margin = 0.0, 1.0, math.inf
    for candidate in _children(parents, node):
        token = int(tokens[candidate])
        if not 0 <= token < vocab:
            continue
        q_x = float(q[token])
        if not (q_x > 0 and math.isfinite(q_x)):
            continue
        ratio = max(float(p[token]) - c * q_x, 0.0) / mass / q_x
        u = uniform(seed, row, candidate, ACCEPT_DRAW)
        margin = min(margin, abs(u - ratio))
        if u < ratio:
            return candidate, None, margin
        next_c = c + mass
        excess = p - next_c * q
        next_mass = float(torch.where(excess > 0, excess, torch.zeros_like(excess)).sum())
        margin = min(margin, next_mass)  # whether the residual has mass left is a threshold too
        if next_mass > 0:
            c, mass = next_c, next_mass
    excess = p - c * q
    weights = p if c == 0 else torch.where(excess > 0, excess, torch.zeros_like(excess))
    if not (weights > 0).any():
        return None, int(torch.argmax(p)), margin
    choice, m = _inverse_cdf(weights, uniform(seed, row, node, SAMPLE_DRAW))
    return None, choice, min(margin, m)
