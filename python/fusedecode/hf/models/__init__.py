"""What fusedecode knows about Hugging Face models, in one place, for scoring (``fusedecode.hf.score``),
SRGen (``fusedecode.hf.correction``) and tree speculation (``fusedecode.hf.speculative``) alike.
This package imports none of them.

- ``architectures``: the architecture table, the per-family facts the code dispatches on (logit
  transforms, layer types and sliding windows, ALiBi, recurrent layers, attention implementations
  that read a 4D mask, cache and ``logits_to_keep`` keywords). A new architecture quirk goes here.
- ``head``: the output head (``OutputHead``: lm_head weight, bias, logit scale, soft-cap), its
  logits for a hidden state plus a ``delta``, and the check against the model's own logits.
- ``hidden``: the module under the head and the hook keeping its output (``FinalHiddenCapture``).
- ``cache``: the cache keyword of ``forward``, where ``generate`` keeps the cache, whether it is filled.
- ``attention``: the attention layout (4D masks per layer type, sliding windows) and the models that
  explicit masks and position ids describe exactly.
- ``forward``: ``logits_to_keep`` and how ``prepare_inputs_for_generation`` is told the new tokens.

The head's transform itself (scale, soft-cap, their slope) is ``fusedecode.head_transform``, below the
ops that apply it.
"""
