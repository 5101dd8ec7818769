"""The final hidden states of a causal LM: the module under its head (``decoder_module``) and a hook
that keeps that module's output, i.e. what ``lm_head`` reads (``FinalHiddenCapture``)."""

import torch


def decoder_module(model):
    """The transformer under a causal LM's head (its output is what ``lm_head`` reads), or None.
    ``get_decoder()`` where it gives one; transformers 4 lacks it for GPT-2, GPT-NeoX, Falcon, Bloom,
    whose ``base_model`` is that transformer (while Gemma3ForCausalLM's ``base_model`` is itself there)."""
    for candidate in (model.get_decoder() if hasattr(model, "get_decoder") else None, model.base_model):
        if isinstance(candidate, torch.nn.Module) and candidate is not model:
            return candidate
    return None


class FinalHiddenCapture:
    """Keeps the output of the model's decoder (``model.get_decoder()``: the stack up to and including
    the last norm), i.e. what ``lm_head`` is applied to, for every position of each forward pass.
    ``user`` names the caller in error messages.

    A forward hook rather than ``output_hidden_states=True``, which would also return every layer's
    states: ``num_layers`` times the ``[B, T, H]`` needed, gigabytes for a long prompt.
    """

    def __init__(self, model, user="fusedecode"):
        decoder = decoder_module(model)
        if decoder is None:
            raise ValueError(f"{user} needs model.get_decoder() or model.base_model (the transformer under lm_head) to "
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
