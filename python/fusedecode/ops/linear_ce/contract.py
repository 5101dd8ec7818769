"""``linear_cross_entropy_entropy``'s contract: the forward op's output table and the custom-op schemas.

Below the op (``op.py``), which reads it.
"""

from ...backends import OpBackends
from .._outputs import Output, schema_returns

# ------------------------------------------------------------------------------------------------
# Outputs of the forward op: the losses, then what the backward scales by the upstream gradients
# (for upstream 1, in the accumulation dtype: float64 for float64 inputs, else float32)

BATCH, ACCUMULATE = ("batch",), "accumulate"
FORWARD_OUTPUTS = (
    Output("ce", ACCUMULATE, BATCH),
    Output("entropy", ACCUMULATE, BATCH),
    Output("ce_scale", ACCUMULATE, BATCH),  # 1 / counted rows
    Output("grad_hidden_ce", ACCUMULATE, ("batch", "tokens", "width"), requested_by="need_hidden"),
    Output("grad_delta_ce", ACCUMULATE, ("batch", "width"), requested_by="need_delta"),
    Output("grad_weight_ce", ACCUMULATE, ("vocab", "width"), requested_by="weight_now"),  # B == 1 only
    Output("grad_bias_ce", ACCUMULATE, ("batch", "vocab"), requested_by="need_bias"),
    Output("entropy_grad_logits", ACCUMULATE, ("batch", "vocab")),
    Output("entropy_grad_hidden", ACCUMULATE, ("batch", "width"), requested_by="need_input"),
)

BACKENDS = OpBackends("linear_cross_entropy_entropy", ("triton", "torch"))
FORWARD_ARGUMENTS = ("(Tensor hidden, Tensor weight, Tensor targets, Tensor? delta, Tensor? bias, float? logit_scale, "
                     "float? softcap, float temperature, int ignore_index, int chunk, bool need_hidden, "
                     "bool need_delta, bool need_weight, bool need_bias)")
FORWARD_SCHEMA = f"{FORWARD_ARGUMENTS} -> {schema_returns(FORWARD_OUTPUTS)}"
WEIGHT_GRAD_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor targets, Tensor? delta, Tensor? bias, float? logit_scale, "
                      "float? softcap, Tensor ce_scale, int ignore_index, int chunk) -> Tensor")
# Every custom op of this op and its schema (tests/ops/test_registry.py compares them with torch's).
SCHEMAS = {"linear_ce_forward": FORWARD_SCHEMA, "linear_ce_weight_grad": WEIGHT_GRAD_SCHEMA,
           "linear_ce_forward_triton": FORWARD_SCHEMA, "linear_ce_weight_grad_triton": WEIGHT_GRAD_SCHEMA}
