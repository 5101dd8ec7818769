"""``logit_stats``' torch backend: the readable reference in plain torch, float64 capable.

Every other backend and every test is checked against it. It favours clarity over speed (several
passes over the logits), and doubles as the "plain torch composite" in benchmarks. It implements the
definitions of ``logit_stats`` (``op.py``); its result type comes from ``contract.py``, below both.
"""

import math

import torch

from ..._validation import float32_temperature_ok, temperature_in_float32_range
from .contract import LogitStats


def logit_stats_reference(logits, temperature=1.0, token_ids=None, topk=0, dtype=torch.float32):
    """``logit_stats``, returned in ``dtype``: float32 for the torch backend,
    float64 as the test oracle. ``argmax`` is int64.

    Always computed in float64 and relative to the row maximum: z - max z = (x - max x) / T is
    exact there for any float32 logits and temperature, so large offsets (1e6 + noise), tiny
    temperatures, entries near the float32 maximum or -1e20 / finfo.min masking come out exact,
    never as the difference of two large numbers.

    ``temperature`` is a positive float or a tensor of shape ``logits.shape[:-1]``; ``token_ids`` an
    integer tensor of that shape or None; ``topk`` in 0..64 (0: no ``topk_confidence``).
    Definitions: ``logit_stats`` (``ops/logit_stats/op.py``).
    """
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
