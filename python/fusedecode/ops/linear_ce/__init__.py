"""``fusedecode.linear_cross_entropy_entropy``, one op as one slice (the layout of ``ops/logit_stats/``):
``contract.py`` (the forward op's output table, schemas), ``reference.py`` (the naive oracle and the
naive language-model head), ``checks.py`` (argument checks), ``op.py`` (public function, dispatch,
custom ops with autograd). This package re-exports their names.
"""

from .checks import check_linear_ce_args
from .contract import BACKENDS, FORWARD_OUTPUTS, FORWARD_SCHEMA, SCHEMAS, WEIGHT_GRAD_SCHEMA
from .op import default_chunk, linear_cross_entropy_entropy
from .reference import head_logits_reference, linear_cross_entropy_entropy_reference

__all__ = ["linear_cross_entropy_entropy", "default_chunk", "FORWARD_OUTPUTS", "check_linear_ce_args",
           "linear_cross_entropy_entropy_reference", "head_logits_reference", "BACKENDS", "FORWARD_SCHEMA",
           "WEIGHT_GRAD_SCHEMA", "SCHEMAS"]
