"""``logit_stats``'s argument checks (docs/errors.md), written with the primitives of
``_validation.py``: checks only; turning the arguments into the custom ops' inputs is ``op.py``'s
next step.
"""

from ..._validation import (INDEX_DTYPES, check_int, check_logits, check_tensor, check_temperature,
                            check_values_in_range)
from .contract import MAX_TOPK


def check_logit_stats_args(logits, temperature, token_ids, topk):
    """``fusedecode.logit_stats``'s arguments (docs/errors.md)."""
    check_logits("logits", logits)
    check_temperature(temperature, rows_of=logits)
    if token_ids is not None:
        check_tensor("token_ids", token_ids, INDEX_DTYPES, shape=logits.shape[:-1], device=logits.device)
        check_values_in_range("token_ids", token_ids, 0, logits.shape[-1])
    check_int("topk", topk, 0, MAX_TOPK)
