"""The torch backend of every op, in one namespace: the readable reference implementations that
every other backend and every test is checked against (plain torch, float64 capable).

Each reference lives in its op's slice, beside the op it defines (``ops/<op>/reference.py``); this
module only gathers them under the name the docs and benchmarks use, ``fusedecode.reference``.
"""

from .ops.linear_ce.reference import head_logits_reference, linear_cross_entropy_entropy_reference
from .ops.logit_stats.reference import logit_stats_backward, logit_stats_reference
from .ops.verify_tree.reference import verify_tree_reference

__all__ = ["logit_stats_reference", "logit_stats_backward", "verify_tree_reference",
           "linear_cross_entropy_entropy_reference", "head_logits_reference"]
