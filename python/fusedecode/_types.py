"""Result types of the public ops."""

from typing import NamedTuple, Optional

import torch


class LogitStats(NamedTuple):
    """Per-row statistics of a logits tensor ``[..., V]``; every field has shape ``[...]``.

    See DESIGN section 3 (or ``fusedecode.logit_stats``) for the exact definitions.
    """

    logsumexp: torch.Tensor
    entropy: torch.Tensor
    varentropy: torch.Tensor
    self_certainty: torch.Tensor
    max_logprob: torch.Tensor
    argmax: torch.Tensor
    token_logprob: Optional[torch.Tensor] = None
    topk_confidence: Optional[torch.Tensor] = None
