"""fusedecode: fused kernels for LLM decoding research.

One pass over a logits tensor gives per-token entropy, varentropy, self-certainty, log-sum-exp,
top-1 log-prob and DeepConf confidence (``logit_stats``), on four backends: ``cuda``, ``triton``,
``cpp`` and ``torch`` (the reference). Set ``TRITON_INTERPRET=1`` before importing fusedecode to
run the Triton kernels on CPU tensors.
"""

from ._info import build_info, __version__
from ._types import LogitStats
from .backends import available_backends
from .logit_stats import logit_stats

__all__ = ["logit_stats", "LogitStats", "available_backends", "build_info", "__version__"]
