"""SRGen: entropy-triggered corrective decoding for ``model.generate`` (Mu et al., 2025).

Each step the model's entropy at the sampling temperature is compared with a threshold drawn from the
row's recent entropies. When it exceeds the threshold, a vector ``delta`` added to the final hidden
state (after the last norm, before ``lm_head``) is optimised for a few AdamW steps so that the context
becomes more likely (cross-entropy of the tokens so far) and the current step less uncertain; the
token is then drawn from ``lm_head(hidden + delta)`` and ``delta`` is dropped. The KV cache is left
untouched because ``delta`` acts after the last layer.

The cross-entropy over the whole context uses ``fusedecode.linear_cross_entropy_entropy``, which never
materialises ``[T, V]`` logits; the context's final hidden states are kept from the forward passes
generation already makes, so a correction never re-runs the model. Models whose logits are not plain
``lm_head(hidden)`` (an lm_head bias, a logit scale, final soft-capping) are handled exactly: the
head's transform is read from the model and checked once against the model's own logits.

The trigger follows the authors' code (SRGen/tnot_decorator.py, ``apply_entropy_control``, driven by
``generate_with_entropy_control`` in SRGen/base_evaluator.py of the official repository): see
``SRGenConfig``.

The parts (the final hidden states and the model's head, transform included, are
``fusedecode.hf.models``):

- ``config``: ``SRGenConfig``, the trigger's and the optimisation's settings.
- ``trigger``: ``EntropyTrigger``, which rows to correct at each step.
- ``corrector``: the context's hidden states, the optimisation of ``delta``, the corrected logits.
- ``generate``: the ``custom_generate`` entry point ``srgen`` and its decode loop.
"""

from .config import SRGenConfig
from .generate import SRGenOutput, srgen

__all__ = ["SRGenConfig", "SRGenOutput", "srgen"]
