"""The torch backend: readable reference implementations in plain torch, float64 capable.

Every other backend and every test is checked against these functions. They favour clarity over
speed (several passes over the logits), and double as the "plain torch composite" in benchmarks.
They implement the definitions of the op files (``python/fusedecode/ops/<op>.py``), which import
this module; the result types are imported from there when called.
"""

import math

import torch

from ._validation import float32_temperature_ok, temperature_in_float32_range


def logit_stats_reference(logits, temperature=1.0, token_ids=None, topk=0, dtype=torch.float32):
    """``logit_stats``, returned in ``dtype``: float32 for the torch backend,
    float64 as the test oracle. ``argmax`` is int64.

    Always computed in float64 and relative to the row maximum: z - max z = (x - max x) / T is
    exact there for any float32 logits and temperature, so large offsets (1e6 + noise), tiny
    temperatures, entries near the float32 maximum or -1e20 / finfo.min masking come out exact,
    never as the difference of two large numbers.

    ``temperature`` is a positive float or a tensor of shape ``logits.shape[:-1]``; ``token_ids`` an
    integer tensor of that shape or None; ``topk`` in 0..64 (0: no ``topk_confidence``).
    Definitions: ``python/fusedecode/ops/logit_stats.py``.
    """
    from .ops.logit_stats import LogitStats

    x = logits.to(torch.float64)
    if isinstance(temperature, torch.Tensor):
        temperature_col = temperature.to(torch.float64).unsqueeze(-1)
        temperature_ok = temperature_in_float32_range(temperature)
    else:
        temperature_col = torch.tensor(float(temperature), dtype=torch.float64, device=logits.device)
        temperature_ok = torch.full(logits.shape[:-1], float32_temperature_ok(float(temperature)), dtype=torch.bool,
                                    device=logits.device)
    masked = x == -math.inf
    finite = torch.isfinite(x)
    count = finite.sum(-1)
    poisoned = (torch.isnan(x) | (x == math.inf)).any(-1)
    invalid = poisoned | (count == 0) | ~temperature_ok

    # Gaps to the row max in z units (-inf for masked entries); invalid rows get a harmless max of
    # 0 here and NaN at the end. The -inf is put in after the division, so that a masked entry's gap
    # is a constant (its gradient with respect to the temperature is 0, not 0 * inf).
    neg_inf = torch.full_like(x, -math.inf)
    x_max = torch.where(invalid, torch.zeros_like(x[..., 0]), torch.where(finite, x, neg_inf).max(-1).values)
    finite_x = torch.where(finite, x, x_max.unsqueeze(-1))
    gap = torch.where(finite, (finite_x - x_max.unsqueeze(-1)) / temperature_col, neg_inf)
    log_s = torch.logsumexp(torch.where(invalid.unsqueeze(-1), torch.zeros_like(gap), gap), dim=-1)
    log_p = gap - log_s.unsqueeze(-1)
    p = torch.where(finite, log_p.exp(), torch.zeros_like(log_p))
    log_p_finite = torch.where(finite, log_p, torch.zeros_like(log_p))
    entropy = -(p * log_p_finite).sum(-1)
    varentropy = (p * (log_p_finite + entropy.unsqueeze(-1)) ** 2).sum(-1)
    count_f = count.to(torch.float64).clamp_min(1)
    mean_gap = torch.where(finite, gap, torch.zeros_like(gap)).sum(-1) / count_f
    self_certainty = log_s - mean_gap - torch.log(count_f)
    max_logprob = -log_s
    logsumexp = x_max / temperature_col.squeeze(-1) + log_s
    # Scaling by 1/T > 0 keeps the order, so the argmax of the raw logits is exact (ties -> lowest).
    argmax = logits.argmax(-1)

    nan = torch.tensor(math.nan, dtype=torch.float64, device=logits.device)
    fields = dict(
        logsumexp=torch.where(invalid, nan, logsumexp),
        entropy=torch.where(invalid, nan, entropy),
        varentropy=torch.where(invalid, nan, varentropy),
        self_certainty=torch.where(invalid, nan, self_certainty),
        max_logprob=torch.where(invalid, nan, max_logprob),
        argmax=torch.where(invalid, torch.full_like(argmax, -1), argmax),
    )
    if token_ids is not None:
        token_gap = gap.gather(-1, token_ids.to(torch.int64).unsqueeze(-1)).squeeze(-1)
        fields["token_logprob"] = torch.where(invalid, nan, token_gap - log_s)
    if topk > 0:
        k = min(topk, x.shape[-1])
        top_gap = gap.topk(k, dim=-1).values
        keep = torch.minimum(count, torch.tensor(topk, device=logits.device))
        in_top = torch.arange(k, device=logits.device) < keep.unsqueeze(-1)
        top_mean = torch.where(in_top, top_gap, torch.zeros_like(top_gap)).sum(-1) / keep.to(torch.float64).clamp_min(1)
        # -(1/k) sum of the k largest log p = log s - mean of their gaps
        fields["topk_confidence"] = torch.where(invalid, nan, log_s - top_mean)
    fields = {name: value if name == "argmax" else value.to(dtype) for name, value in fields.items()}
    return LogitStats(**fields)


def logit_stats_backward(logits, temperature, token_ids, topk, grads, temperature_grad=False):
    """The gradients of ``logit_stats`` (every backend's backward): ``(grad_logits, grad_temperature)``
    for the float ``grads`` of its outputs (a dict by field name, None for fields without one).

    Autograd through ``logit_stats_reference`` in float64 (the definitions are written once), then
    every entry of a row whose statistics are NaN (NaN or +inf in the row, no finite entry) gets a
    NaN gradient. Masked (-inf) entries get 0: their probability stays 0 under any finite change.
    ``grad_logits`` has the logits' dtype; ``grad_temperature`` is None unless ``temperature_grad``
    (``temperature`` is then a tensor). The statistics are recomputed, materialising a few ``[..., V]`` float64
    tensors (the forward of the fused backends never does).
    """
    wants_temperature = temperature_grad and isinstance(temperature, torch.Tensor)
    with torch.enable_grad():
        x = logits.detach().to(torch.float64).requires_grad_()
        t = temperature.detach().to(torch.float64).requires_grad_() if wants_temperature else temperature
        stats = logit_stats_reference(x, t, token_ids, topk, dtype=torch.float64)
        pairs = [(getattr(stats, name), grad.to(torch.float64)) for name, grad in grads.items()
                 if grad is not None and getattr(stats, name) is not None]
        inputs = [x, t] if wants_temperature else [x]
        if pairs:
            found = torch.autograd.grad([value for value, _ in pairs], inputs, [grad for _, grad in pairs],
                                        allow_unused=True)
        else:
            found = [None] * len(inputs)
    invalid = stats.argmax == -1  # exactly the rows whose float fields are NaN
    nan = torch.tensor(math.nan, dtype=torch.float64, device=logits.device)
    grad_x = found[0] if found[0] is not None else torch.zeros_like(x)
    grad_x = torch.where(invalid.unsqueeze(-1), nan, grad_x).to(logits.dtype)
    if not wants_temperature:
        return grad_x, None
    grad_t = found[1] if found[1] is not None else torch.zeros_like(t)
    return grad_x, torch.where(invalid, nan, grad_t).to(temperature.dtype)


# ------------------------------------------------------------------------------------------------
# verify_tree


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
    """``verify_tree`` (definitions: ``python/fusedecode/ops/verify_tree.py``) as a plain walk over
    each tree, one batch row at a time.

    ``draft_tokens`` and ``parents`` are int64 ``[B, N]``, ``seeds`` int64 ``[B]`` (as the op prepares
    them for its custom ops), ``depth`` the tree depth D. Returns a ``TreeVerification``.

    Unvalidated input follows the fused backends: node c is a child of r only when
    ``parents[c] == r < c`` (so a node with an out-of-range or later parent is unreachable), and a
    draft token outside [0, V) is never accepted.
    """
    from .ops.verify_tree import TreeVerification

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


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy_entropy


def linear_cross_entropy_entropy_reference(hidden, weight, targets, delta=None, temperature=1.0, ignore_index=-100,
                                           dtype=torch.float64, bias=None, logit_scale=None, softcap=None):
    """``linear_cross_entropy_entropy`` (definitions: ``python/fusedecode/ops/linear_ce.py``) the
    naive way: the whole ``[T, V]`` logits in ``dtype``,
    ``torch.nn.functional`` losses, gradients by autograd. The test oracle (float64) and the
    benchmark's baseline (float32); never use it on long contexts.

    ``hidden`` ``[T, H]`` or ``[B, T, H]``, ``weight`` ``[V, H]``, ``targets`` of hidden's leading
    shape, ``delta`` None, ``[H]`` or ``[B, H]``; the head transform ``bias`` ``[V]``, ``logit_scale``
    and ``softcap`` as in the op. Returns ``(ce, entropy)`` of shape ``[]`` or ``[B]``.
    """
    x = hidden.to(dtype)
    if delta is not None:
        x = x + (delta.to(dtype).unsqueeze(-2) if delta.dim() == x.dim() - 1 else delta.to(dtype))
    logits = head_logits_reference(x, weight, bias, logit_scale, softcap, dtype)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                                               reduction="none").view(targets.shape)
    counted = (targets != ignore_index).sum(-1)
    # No counted row: 0 rather than the 0/0 of a mean (its gradient is 0 too).
    ce = losses.sum(-1) / counted.clamp_min(1).to(dtype)
    log_p = torch.log_softmax(logits[..., -1, :] / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return ce, entropy


def head_logits_reference(hidden, weight, bias=None, logit_scale=None, softcap=None, dtype=torch.float64):
    """A language-model head's logits the naive way, the whole ``[..., T, V]`` in ``dtype``:
    ``hidden @ weight.T + bias``, then ``* logit_scale``, then ``softcap * tanh(z / softcap)``, each
    step only if its argument is given (``fusedecode.head_transform``)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits

