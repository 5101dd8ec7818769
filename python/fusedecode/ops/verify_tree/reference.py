"""``verify_tree``'s torch backend: the reference walk in plain torch, one tree at a time.

Every other backend and every test is checked against it. It implements the definitions of
``verify_tree`` (``op.py``); its result type comes from ``contract.py``, below both.
"""

import math

import torch

from ..logit_stats.reference import logit_stats_reference
from .contract import TreeVerification


def _mix64(*values):
    """splitmix64 over a few integers: a seed for one (seed, row, node, purpose) random stream."""
    state = 0
    for value in values:
        state = (state + (int(value) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


SAMPLE, ACCEPT = 0, 1  # purposes of the random streams


def _generator(seed, row, node, purpose):
    g = torch.Generator()
    g.manual_seed(_mix64(seed, row, node, purpose))
    return g


def verify_tree_reference(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth,
                          dtype=torch.float32):
    """``verify_tree`` (definitions: ``ops/verify_tree/op.py``) as a plain walk over
    each tree, one batch row at a time.

    ``draft_tokens`` and ``parents`` are int64 ``[B, N]``, ``seeds`` int64 ``[B]`` (as the op prepares
    them for its custom ops), ``depth`` the tree depth D. Returns a ``TreeVerification``.

    Unvalidated input follows the fused backends: node c is a child of r only when
    ``parents[c] == r < c`` (so a node with an out-of-range or later parent is unreachable), and a
    draft token outside [0, V) is never accepted.
    """
    batch, nodes, vocab = target_logits.shape
    device = target_logits.device
    stats_temperature = temperature if temperature > 0 else 1.0
    stats = logit_stats_reference(target_logits, stats_temperature, dtype=dtype)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    accepted_nodes = torch.full((batch, depth + 1), -1, dtype=torch.int64)
    output_tokens = torch.full((batch, depth + 1), -1, dtype=torch.int64)
    logits = target_logits.detach().cpu().to(torch.float64)
    tokens = draft_tokens.cpu()
    parent_rows = parents.cpu()
    valid_rows = (stats.argmax >= 0).cpu()
    q_rows = draft_probs.detach().cpu().to(torch.float64) if draft_probs is not None else None

    for b in range(batch):
        seed = int(seeds[b])
        children = [[] for _ in range(nodes)]
        for i in range(1, nodes):
            parent = int(parent_rows[b, i])
            if 0 <= parent < i:
                children[parent].append(i)
        node, count = 0, 0
        accepted_nodes[b, 0] = 0
        while True:
            if not valid_rows[b, node]:
                break  # a NaN/inf row: no token can be emitted, output stays -1
            if temperature == 0:
                chosen = int(torch.argmax(logits[b, node]))
                child = next((c for c in children[node] if int(tokens[b, c]) == chosen), None)
            else:
                # Relative to the row max: x / T itself may leave every float range.
                row = logits[b, node]
                p = torch.softmax((row - row.max()) / temperature, dim=-1)
                if q_rows is None:
                    chosen = int(torch.multinomial(p, 1, generator=_generator(seed, b, node, SAMPLE)))
                    child = next((c for c in children[node] if int(tokens[b, c]) == chosen), None)
                else:
                    child, chosen = _specinfer_node(p, q_rows[b, node], children[node], tokens[b], seed, b, node)
            if child is None:
                output_tokens[b, count] = chosen
                break
            output_tokens[b, count] = int(tokens[b, child])
            count += 1
            accepted_nodes[b, count] = child
            node = child
        num_accepted[b] = count
    return TreeVerification(num_accepted.to(device), accepted_nodes.to(device), output_tokens.to(device), stats)


def _specinfer_node(p, q, children, tokens, seed, b, node):
    """SpecInfer's multi-draft rejection sampling at one node: (accepted child or None, token)."""
    residual = p.clone()
    for child in children:
        token = int(tokens[child])
        if not 0 <= token < q.shape[0]:
            continue  # padding node (or a token outside [0, V), never accepted)
        q_token = float(q[token])
        if not (math.isfinite(q_token) and q_token > 0):
            continue  # could not have been drawn from q: skipped
        u = float(torch.rand((), generator=_generator(seed, b, child, ACCEPT), dtype=torch.float64))
        if u < min(1.0, float(residual[token]) / q_token):
            return child, token
        leftover = (residual - q).clamp_min(0)
        total = float(leftover.sum())
        if total > 0:
            residual = leftover / total
    token = int(torch.multinomial(residual, 1, generator=_generator(seed, b, node, SAMPLE)))
    return None, token
