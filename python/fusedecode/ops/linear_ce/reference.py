"""``linear_cross_entropy_entropy``'s oracle: the whole logits, ``torch.nn.functional`` losses, autograd.

Also the naive language-model head (``head_logits_reference``) that ``linear_logit_stats``' tests
put under ``logit_stats_reference``.
"""

import torch


def linear_cross_entropy_entropy_reference(hidden, weight, targets, delta=None, temperature=1.0, ignore_index=-100,
                                           dtype=torch.float64, bias=None, logit_scale=None, softcap=None):
    """``linear_cross_entropy_entropy`` (definitions: ``ops/linear_ce/op.py``) the
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
