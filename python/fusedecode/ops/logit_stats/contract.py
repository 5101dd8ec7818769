"""``logit_stats``' contract: its output table, result type, argument limit and custom-op schema.

Below the op (``op.py``) and its torch reference (``reference.py``), which both read it; the
integrations take their per-token field lists from ``float_outputs``.
"""

import torch

from ...backends import OpBackends
from .._outputs import Output, named_tuple, public_fields, schema_returns

# The largest ``topk`` of ``topk_confidence``: the kernels keep a row's k largest logits on chip
# (the C++ op and the CUDA kernel declare the same bound). The one Python definition.
MAX_TOPK = 64

# ------------------------------------------------------------------------------------------------
# Outputs: one value per row of the logits (the custom ops return them flat, ``[rows]``)

ROWS = ("rows",)
OUTPUTS = (
    Output("logsumexp", torch.float32, ROWS),
    Output("entropy", torch.float32, ROWS),
    Output("varentropy", torch.float32, ROWS),
    Output("self_certainty", torch.float32, ROWS),
    Output("max_logprob", torch.float32, ROWS),
    Output("argmax", torch.int64, ROWS),
    Output("token_logprob", torch.float32, ROWS, requested_by="token_ids"),
    Output("topk_confidence", torch.float32, ROWS, requested_by="topk"),
)


def float_outputs(*requested):
    """Names of the float32 outputs, in table order, that are always computed or are asked for by
    one of ``requested`` (argument names: ``"token_ids"``, ``"topk"``). The per-token statistics the
    integrations record (``UncertaintyProcessor``, ``fusedecode.vllm``'s records and ``TraceStats``)
    take their field lists from here."""
    return tuple(output.name for output in OUTPUTS if output.dtype == torch.float32
                 and (output.requested_by is None or output.requested_by in requested))


LogitStats = named_tuple("LogitStats", public_fields(OUTPUTS), """Per-row statistics of a logits tensor ``[..., V]``; every field has shape ``[...]``.

    See ``fusedecode.logit_stats`` for the exact definitions.
    """)

BACKENDS = OpBackends("logit_stats")
# The custom ops take the logits viewed as [outer, inner, V], the temperature as a float32 tensor
# [rows] or None plus a scalar, the token ids as int64 [rows] or None.
ARGUMENTS = "(Tensor logits, Tensor? temperature, float temperature_scalar, Tensor? token_ids, int topk)"
SCHEMA = f"{ARGUMENTS} -> {schema_returns(OUTPUTS)}"
# Every custom op of this op and its schema (tests/ops/test_registry.py compares them with torch's).
SCHEMAS = {"logit_stats": SCHEMA, "logit_stats_triton": SCHEMA}


def requested_outputs(token_ids, topk):
    """Which optional outputs the call asks for (the ``requested_by`` conditions of ``OUTPUTS``).
    Public, as ``temperature_arguments``: ``linear_logit_stats`` returns the same outputs."""
    return {"token_ids": token_ids is not None, "topk": topk > 0}
