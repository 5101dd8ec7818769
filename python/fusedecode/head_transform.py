"""The transform a language-model head applies to its logits, for the fused ops that compute the
head's logits themselves (``linear_cross_entropy_entropy``; also meant for a fused head + logit_stats).

Many models' logits are not just ``hidden @ weight.T``. In this order:

    z = hidden @ weight.T + bias            an lm_head bias (Phi, GPT-J, CodeGen)
    z = z * logit_scale                     a scalar scale (Cohere: ``logit_scale``; Granite:
                                            ``1 / logits_scaling``)
    z = softcap * tanh(z / softcap)         final soft-capping (Gemma 2/3: ``final_logit_softcapping``)

The bias is a row added to the logits; the op adds it with any other per-row offset before calling
``apply_head_transform``, which does the other two steps in place, in the models' own order of
operations (so that, in float32, the result is the model's logits bit for bit). The gradient of the
transform is ``logit_scale * (1 - (y / softcap)^2)`` at ``y``, the transformed logit.
"""

from typing import NamedTuple, Optional

import torch

from ._validation import check_float, check_tensor

__all__ = ["HeadTransform", "check_head_transform", "apply_head_transform", "head_transform_slope"]


class HeadTransform(NamedTuple):
    """A validated head transform: ``bias`` a ``[V]`` tensor or None, ``logit_scale`` and ``softcap``
    floats or None (None: that step is skipped)."""

    bias: Optional[torch.Tensor]
    logit_scale: Optional[float]
    softcap: Optional[float]


def check_head_transform(bias, logit_scale, softcap, weight):
    """Validates the head transform of a ``[V, H]`` lm_head ``weight``: ``bias`` None or ``[V]`` of the
    weight's dtype or float32 on its device, ``logit_scale`` None or a finite float, ``softcap`` None
    or a finite float > 0. Returns a ``HeadTransform`` with plain floats."""
    if bias is not None:
        check_tensor("bias", bias, tuple(dict.fromkeys((weight.dtype, torch.float32))), shape=(weight.shape[0],),
                     device=weight.device, device_of="weight", dtype_of="weight")
    if logit_scale is not None:
        logit_scale = check_float("logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_float("softcap", softcap, low=0.0)
        if softcap == 0:
            raise ValueError("softcap must be > 0, got 0")
    return HeadTransform(bias, logit_scale, softcap)


def apply_head_transform(logits, logit_scale, softcap):
    """Scales then soft-caps ``logits`` (bias already added) in place; returns them."""
    if logit_scale is not None:
        logits.mul_(logit_scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def head_transform_slope(transformed, logit_scale, softcap):
    """``dy/dz`` at the transformed logits ``y``: a ``[rows, V]`` tensor with soft-capping, else the
    float ``logit_scale`` (1.0 without a scale)."""
    scale = 1.0 if logit_scale is None else logit_scale
    if softcap is None:
        return scale
    return (transformed / softcap).square_().neg_().add_(1.0).mul_(scale)
