"""``fusedecode.linear_logit_stats``, one op as one slice (the layout of ``ops/logit_stats/``):
``contract.py`` (schemas; the outputs are ``logit_stats``' table), ``checks.py`` (argument checks),
``op.py`` (public function, the tiled pass, custom ops). Its oracle is ``logit_stats_reference`` of
``head_logits_reference`` (``ops/logit_stats/reference.py``, ``ops/linear_ce/reference.py``). This
package re-exports the slice's names.
"""

from .checks import check_linear_logit_stats_args
from .contract import ARGUMENTS, BACKENDS, SCHEMA, SCHEMAS
from .op import allocate_outputs, linear_logit_stats

__all__ = ["linear_logit_stats", "allocate_outputs", "check_linear_logit_stats_args", "ARGUMENTS", "BACKENDS",
           "SCHEMA", "SCHEMAS"]
