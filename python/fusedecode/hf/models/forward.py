"""What a model's ``forward`` and its generation input preparation take, beyond the cache
(``cache``) and the attention mask (``attention``): how many positions' logits to compute, and how
``prepare_inputs_for_generation`` is told which tokens are new. Each answer is read from a signature,
never from a version string, and never from one model's override of a generation method (models
override them with ``**kwargs`` signatures that hide what the base class does)."""

import functools
import inspect

from transformers.generation.utils import GenerationMixin

from .architectures import LOGITS_TO_KEEP_KEYWORDS


def logits_to_keep_keyword(model):
    """The keyword by which the model's ``forward`` computes only the last positions' logits
    (``logits_to_keep``, ``num_logits_to_keep`` before transformers 4.50), or None when it takes none
    (then it computes every position's)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in LOGITS_TO_KEEP_KEYWORDS if name in parameters), None)


@functools.lru_cache(maxsize=None)
def slices_by_next_sequence_length():
    """True where ``GenerationMixin.prepare_inputs_for_generation`` takes the new tokens' count as
    ``next_sequence_length`` (transformers 5); transformers 4 slices by ``cache_position`` instead.
    Asked of the base class: a model's own override may hide the keyword behind ``**kwargs``."""
    return "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
