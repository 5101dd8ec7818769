"""The torch backend: readable reference implementations in plain torch, float64 capable.

Every other backend and every test is checked against these functions. They favour clarity over
speed (several passes over the logits), and double as the "plain torch composite" in benchmarks.
"""

import math

import torch

from ._types import LogitStats


def logit_stats_reference(logits, temperature=1.0, token_ids=None, topk=0, dtype=torch.float32):
    """``logit_stats`` (DESIGN section 3) computed in ``dtype``: float32 for the torch backend,
    float64 as the test oracle. Float fields come back in ``dtype``; ``argmax`` is int64.

    ``temperature`` is a positive float or a tensor of shape ``logits.shape[:-1]``; ``token_ids`` an
    integer tensor of that shape or None; ``topk`` in 0..64 (0: no ``topk_confidence``).
    """
    if isinstance(temperature, torch.Tensor):
        temperature_col = temperature.to(dtype).unsqueeze(-1)
        temperature_ok = torch.isfinite(temperature) & (temperature > 0)
    else:
        temperature_col = torch.tensor(float(temperature), dtype=dtype, device=logits.device)
        temperature_ok = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    z = logits.to(dtype) / temperature_col
    masked = z == -math.inf
    finite = ~masked
    count = finite.sum(-1)
    poisoned = (torch.isnan(z) | (z == math.inf)).any(-1)
    invalid = poisoned | (count == 0) | ~temperature_ok

    # Replace what would poison the arithmetic; invalid rows are overwritten with NaN at the end.
    z_safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    z_safe = torch.where(masked, torch.full_like(z, -math.inf), z_safe)
    logsumexp = torch.logsumexp(z_safe, dim=-1)
    log_p = z_safe - logsumexp.unsqueeze(-1)
    p = torch.where(finite, log_p.exp(), torch.zeros_like(log_p))
    log_p_finite = torch.where(finite, log_p, torch.zeros_like(log_p))
    entropy = -(p * log_p_finite).sum(-1)
    varentropy = (p * (log_p_finite + entropy.unsqueeze(-1)) ** 2).sum(-1)
    count_f = count.to(dtype).clamp_min(1)
    mean_z = torch.where(finite, z_safe, torch.zeros_like(z_safe)).sum(-1) / count_f
    self_certainty = logsumexp - mean_z - torch.log(count_f)
    max_logprob = z_safe.max(-1).values - logsumexp
    # Scaling by 1/T > 0 keeps the order, so the argmax of the raw logits is exact (ties -> lowest).
    argmax = logits.argmax(-1)

    nan = torch.tensor(math.nan, dtype=dtype, device=logits.device)
    fields = dict(
        logsumexp=torch.where(invalid, nan, logsumexp),
        entropy=torch.where(invalid, nan, entropy),
        varentropy=torch.where(invalid, nan, varentropy),
        self_certainty=torch.where(invalid, nan, self_certainty),
        max_logprob=torch.where(invalid, nan, max_logprob),
        argmax=torch.where(invalid, torch.full_like(argmax, -1), argmax),
    )
    if token_ids is not None:
        token_z = z.gather(-1, token_ids.to(torch.int64).unsqueeze(-1)).squeeze(-1)
        fields["token_logprob"] = torch.where(invalid, nan, token_z - logsumexp)
    if topk > 0:
        k = min(topk, z.shape[-1])
        top_log_p = z_safe.topk(k, dim=-1).values - logsumexp.unsqueeze(-1)
        keep = torch.minimum(count, torch.tensor(topk, device=logits.device))
        position = torch.arange(k, device=logits.device)
        in_top = position < keep.unsqueeze(-1)
        top_sum = torch.where(in_top, top_log_p, torch.zeros_like(top_log_p)).sum(-1)
        confidence = -top_sum / keep.to(dtype).clamp_min(1)
        fields["topk_confidence"] = torch.where(invalid, nan, confidence)
    return LogitStats(**fields)
