"""``linear_logit_stats``' contract: its outputs (``logit_stats``' table) and custom-op schemas.

Below the op (``op.py``), which reads it.
"""

from ...backends import OpBackends
from .._outputs import schema_returns
from ..logit_stats.contract import OUTPUTS

# ------------------------------------------------------------------------------------------------
# Outputs: logit_stats' table (``OUTPUTS``, with its ``requested_outputs`` conditions), one value
# per row of hidden; the custom ops return them flat, ``[rows]``.

BACKENDS = OpBackends("linear_logit_stats")
# The custom ops take hidden viewed as [rows, H], the head transform (bias [V] or None, scale and
# soft-cap or None), the temperature as a float32 tensor [rows] or None plus a scalar, the token ids
# as int64 [rows] or None, topk and the rows per chunk.
ARGUMENTS = ("(Tensor hidden, Tensor weight, Tensor? bias, float? logit_scale, float? softcap, Tensor? temperature, "
             "float temperature_scalar, Tensor? token_ids, int topk, int chunk)")
SCHEMA = f"{ARGUMENTS} -> {schema_returns(OUTPUTS)}"
# Every custom op of this op and its schema (tests/ops/test_registry.py compares them with torch's).
SCHEMAS = {"linear_logit_stats": SCHEMA, "linear_logit_stats_triton": SCHEMA}
