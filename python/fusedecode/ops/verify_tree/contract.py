"""``verify_tree``'s contract: its output table, result type and custom-op schema.

Below the op (``op.py``) and its torch reference (``reference.py``), which both read it. The
per-node statistics are ``logit_stats``' always-computed outputs, taken from its contract.
"""

import torch

from ...backends import OpBackends
from .._outputs import Output, named_tuple, public_fields, schema_returns
from ..logit_stats.contract import OUTPUTS as LOGIT_STATS_OUTPUTS
from ..logit_stats.contract import LogitStats

# ------------------------------------------------------------------------------------------------
# Outputs: the walk's, then logit_stats' fields that are always computed, one per node [B, N]

STATS = tuple(output._replace(shape=("batch", "nodes")) for output in LOGIT_STATS_OUTPUTS
              if output.requested_by is None)
OUTPUTS = (
    Output("num_accepted", torch.int64, ("batch",), fill=0),
    Output("accepted_nodes", torch.int64, ("batch", "width"), fill=-1),  # width = D + 1
    Output("output_tokens", torch.int64, ("batch", "width"), fill=-1),
) + STATS
WALK = OUTPUTS[:len(OUTPUTS) - len(STATS)]

TreeVerification = named_tuple("TreeVerification", public_fields(WALK) + [("stats", LogitStats, False)], """Result of ``fusedecode.verify_tree`` for a batch of B draft trees of depth D.

    - ``num_accepted`` ``[B]`` int64: accepted draft tokens (the root excluded).
    - ``accepted_nodes`` ``[B, D+1]`` int64: 0, then the accepted node indices in order; -1 padded.
    - ``output_tokens`` ``[B, D+1]`` int64: the accepted tokens then the bonus/correction token;
      -1 padded (``num_accepted + 1`` valid entries; the last is -1 when that node's row is NaN).
    - ``stats``: ``LogitStats`` of every node's row ``[B, N]`` at the verification temperature
      (1.0 when greedy), from the same pass.
    """)

BACKENDS = OpBackends("verify_tree")
# The custom ops take the arguments as the op's preparation step leaves them: int64 tokens and
# parents [B, N] and seeds [B] on the logits' device, the temperature as a float, the depth D.
ARGUMENTS = ("(Tensor target_logits, Tensor draft_tokens, Tensor parents, float temperature, Tensor? draft_probs, "
             "Tensor seeds, int depth)")
SCHEMA = f"{ARGUMENTS} -> {schema_returns(OUTPUTS)}"
# Every custom op of this op and its schema (tests/ops/test_registry.py compares them with torch's).
SCHEMAS = {"verify_tree": SCHEMA, "verify_tree_triton": SCHEMA}
