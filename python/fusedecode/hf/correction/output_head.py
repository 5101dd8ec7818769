"""The model's output layer as SRGen uses it: the hidden states ``lm_head`` reads
(``FinalHiddenCapture``) and the head that turns them into the model's logits (``OutputHead``, with
the lm_head bias, logit scale and soft-cap the model applies)."""

import torch

from ...head_transform import apply_head_transform, check_head_transform
from .._transformers_compat import decoder_module


def corrected_logits(step_hidden, delta, head):
    """The model's logits for ``hidden + delta`` as float32 ``[n, V]``: ``lm_head(hidden)`` plus
    ``delta @ weight.T``, then the head's transform (``head``: an ``OutputHead``). As in
    ``linear_cross_entropy_entropy``, the small ``delta`` is never added to half-precision hidden
    states, where it would be rounded away; with ``delta = 0`` this is the model's own logits (in
    float32, the same operations)."""
    weight, bias = head.weight, head.transform.bias
    logits = torch.nn.functional.linear(step_hidden.to(weight.dtype), weight, bias).float()
    if delta is not None:
        logits = logits + torch.nn.functional.linear(delta.to(weight.dtype), weight).float()
    return apply_head_transform(logits, head.transform.logit_scale, head.transform.softcap)


class OutputHead:
    """The model's output layer as srgen uses it: the lm_head ``weight`` ``[V, H]`` and the transform
    from ``lm_head``'s input to the model's logits (``transform``: a ``HeadTransform`` of the lm_head
    bias, a logit scale and a soft-cap, each None when absent)."""

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
    """``(logit_scale, softcap)`` of a model's head, read from its (text) config. Each entry was
    checked against the model's forward in transformers 4.57, 5.17 and 5.24; whatever is missed here
    is caught by ``check_head``, which compares the reconstruction with the model's logits."""
    model_type = getattr(config, "model_type", "") or ""
    logit_scale = softcap = None
    # Gemma 2/3/3n, VaultGemma, nanochat: softcap * tanh(logits / softcap).
    if getattr(config, "final_logit_softcapping", None) is not None:
        softcap = config.final_logit_softcapping
    if model_type == "recurrent_gemma" and getattr(config, "logits_soft_cap", None) is not None:
        softcap = config.logits_soft_cap
    # Cohere, Cohere2 (+ MoE): logits * logit_scale.
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        logit_scale = config.logit_scale
    # logits_scaling divides the logits in the Granite family and MiniCPM3 (which divides the hidden
    # states before a bias-free lm_head: the same thing) and multiplies them in HyperCLOVA X.
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and (model_type.startswith("granite") or model_type == "minicpm3"):
        logit_scale = 1.0 / scaling
    if scaling is not None and model_type == "hyperclovax":
        logit_scale = scaling
    return logit_scale, softcap


def read_output_head(model):
    """The model's ``OutputHead``: ``get_output_embeddings()`` (a linear layer, bias allowed) and the
    logit transform its config declares."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("srgen needs a model whose get_output_embeddings() is a linear layer with a [V, H] weight")
    bias = getattr(head, "bias", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    logit_scale, softcap = config_head_transform(config)
    try:
        transform = check_head_transform(bias, logit_scale, softcap, weight)
    except ValueError as error:  # also ArgumentTypeError
        raise ValueError(f"srgen cannot use this model's output layer: {error}") from None
    return OutputHead(weight, transform)


class FinalHiddenCapture:
    """Keeps the output of the model's decoder (``model.get_decoder()``: the stack up to and including
    the last norm), i.e. what ``lm_head`` is applied to, for every position of each forward pass.

    A forward hook rather than ``output_hidden_states=True``, which would also return every layer's
    states: ``num_layers`` times the ``[B, T, H]`` needed, gigabytes for a long prompt.
    """

    def __init__(self, model):
        decoder = decoder_module(model)
        if decoder is None:
            raise ValueError("srgen needs model.get_decoder() or model.base_model (the transformer under lm_head) to "
                             "read the final hidden states")
        self.hidden = None
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def take(self):
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the model's forward did not run its decoder (model.get_decoder())")
        return hidden

    def remove(self):
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.remove()


def check_head(logits, hidden, head):
    """Corrected logits are the head's reconstruction for ``hidden + delta``: refuse a model whose
    logits (at ``delta = 0``) are something else, an output transform srgen does not know, which would
    make corrected and uncorrected logits incomparable. One comparison, on the prompt's last position."""
    recomputed = corrected_logits(hidden, None, head)
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    scale = logits.abs().max().clamp(min=1)
    if recomputed.shape != logits.shape or not torch.allclose(recomputed, logits, rtol=tolerance,
                                                              atol=tolerance * scale):
        raise ValueError(f"srgen reconstructs this model's logits as {head.describe()} from the final hidden "
                         "state (get_output_embeddings() and the config's logit transform), but the model's own "
                         "logits differ: its head transforms the logits in a way srgen does not know")
