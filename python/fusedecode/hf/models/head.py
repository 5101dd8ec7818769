"""A model's output head as fusedecode uses it (``OutputHead``): the lm_head weight and the transform
from ``lm_head``'s input to the model's logits (lm_head bias, logit scale, soft-cap; which family
declares which: ``architectures.LOGIT_TRANSFORMS``), the head's logits for a hidden state plus an
optional ``delta``, and the check that the reconstruction is the model's own logits.

``user`` arguments name the caller (``score``, ``srgen``, ...) in error messages.
"""

import torch

from ...head_transform import apply_head_transform, check_head_transform
from .architectures import LOGIT_TRANSFORMS, text_config


def corrected_logits(step_hidden, delta, head):
    """The model's logits for ``hidden + delta`` as float32 ``[n, V]``: ``lm_head(hidden)`` plus
    ``delta @ weight.T``, then the head's transform (``head``: an ``OutputHead``). As in
    ``linear_cross_entropy_entropy``, the small ``delta`` is never added to half-precision hidden
    states, where it would be rounded away; with ``delta = None`` this is the model's own logits (in
    float32, the same operations)."""
    weight, bias = head.weight, head.transform.bias
    logits = torch.nn.functional.linear(step_hidden.to(weight.dtype), weight, bias).float()
    if delta is not None:
        logits = logits + torch.nn.functional.linear(delta.to(weight.dtype), weight).float()
    return apply_head_transform(logits, head.transform.logit_scale, head.transform.softcap)


class OutputHead:
    """The model's output layer: the lm_head ``weight`` ``[V, H]`` and the transform from ``lm_head``'s
    input to the model's logits (``transform``: a ``HeadTransform`` of the lm_head bias, a logit scale
    and a soft-cap, each None when absent)."""

    def __init__(self, weight, transform):
        self.weight, self.transform = weight, transform

    def detached(self):
        """``(weight, bias)`` detached (never accumulate into the model's ``.grad``) and, under
        inference_mode, cloned so that autograd may save them."""
        tensors = []
        for tensor in (self.weight, self.transform.bias):
            if tensor is not None:
                tensor = tensor.detach()
                if tensor.is_inference():
                    tensor = tensor.clone()
            tensors.append(tensor)
        return tuple(tensors)

    def describe(self):
        parts = ["bias" if self.transform.bias is not None else None,
                 f"logit scale {self.transform.logit_scale:g}" if self.transform.logit_scale is not None else None,
                 f"soft-cap {self.transform.softcap:g}" if self.transform.softcap is not None else None]
        parts = [part for part in parts if part]
        return "lm_head(h)" + (" with " + ", ".join(parts) if parts else "")


def config_head_transform(config):
    """``(logit_scale, softcap)`` of a model's head, read from its (text) config by the rules of
    ``architectures.LOGIT_TRANSFORMS``; whatever they miss is caught by ``check_head``, which compares
    the reconstruction with the model's logits."""
    model_type = getattr(config, "model_type", "") or ""
    steps = {"scale": None, "softcap": None}
    for rule in LOGIT_TRANSFORMS:
        value = getattr(config, rule.field, None)
        if value is None or not rule.applies_to(model_type):
            continue
        if rule.step == "divide":
            steps["scale"] = 1.0 / value
        else:
            steps[rule.step] = value
    return steps["scale"], steps["softcap"]


def read_output_head(model, user="fusedecode"):
    """The model's ``OutputHead``: ``get_output_embeddings()`` (a linear layer, bias allowed) and the
    logit transform its config declares."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{user} needs a model whose get_output_embeddings() is a linear layer with a [V, H] weight")
    bias = getattr(head, "bias", None)
    logit_scale, softcap = config_head_transform(text_config(model.config))
    try:
        transform = check_head_transform(bias, logit_scale, softcap, weight)
    except ValueError as error:  # also ArgumentTypeError
        raise ValueError(f"{user} cannot use this model's output layer: {error}") from None
    return OutputHead(weight, transform)


def check_head(logits, hidden, head, user="fusedecode"):
    """Refuse a model whose logits (``logits``, at the final hidden state ``hidden``) are not the head's
    reconstruction: an output transform missing from ``architectures.LOGIT_TRANSFORMS``, which would
    make the caller's logits differ from the model's own. One comparison, on one position."""
    recomputed = corrected_logits(hidden, None, head)
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    scale = logits.abs().max().clamp(min=1)
    if recomputed.shape != logits.shape or not torch.allclose(recomputed, logits, rtol=tolerance,
                                                              atol=tolerance * scale):
        raise ValueError(f"{user} reconstructs this model's logits as {head.describe()} from the final hidden "
                         "state (get_output_embeddings() and the config's logit transform), but the model's own "
                         f"logits differ: its head transforms the logits in a way {user} does not know")
