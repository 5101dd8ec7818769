"""``fusedecode.logit_stats``, one op as one slice: ``contract.py`` (output table ``OUTPUTS``, result
type ``LogitStats``, ``MAX_TOPK``, custom-op schemas), ``reference.py`` (the torch oracle),
``checks.py`` (argument checks) and ``op.py`` (the public function, backend dispatch, custom ops),
each importing only the ones before it. This package re-exports their names.
"""

from .checks import check_logit_stats_args
from .contract import (ARGUMENTS, BACKENDS, MAX_TOPK, OUTPUTS, SCHEMA, SCHEMAS, LogitStats, float_outputs,
                       requested_outputs)
from .op import allocate_outputs, logit_stats, run_triton, temperature_arguments
from .reference import logit_stats_backward, logit_stats_reference

__all__ = ["logit_stats", "LogitStats", "OUTPUTS", "MAX_TOPK", "float_outputs", "requested_outputs",
           "temperature_arguments", "allocate_outputs", "run_triton", "check_logit_stats_args",
           "logit_stats_reference", "logit_stats_backward", "ARGUMENTS", "BACKENDS", "SCHEMA", "SCHEMAS"]
