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


class TreeVerification(NamedTuple):
    """Result of ``fusedecode.verify_tree`` for a batch of B draft trees of depth D.

    - ``num_accepted`` ``[B]`` int64: accepted draft tokens (the root excluded).
    - ``accepted_nodes`` ``[B, D+1]`` int64: 0, then the accepted node indices in order; -1 padded.
    - ``output_tokens`` ``[B, D+1]`` int64: the accepted tokens then the bonus/correction token;
      -1 padded (``num_accepted + 1`` valid entries; the last is -1 when that node's row is NaN).
    - ``stats``: ``LogitStats`` of every node's row ``[B, N]`` at the verification temperature
      (1.0 when greedy), from the same pass.
    """

    num_accepted: torch.Tensor
    accepted_nodes: torch.Tensor
    output_tokens: torch.Tensor
    stats: LogitStats
