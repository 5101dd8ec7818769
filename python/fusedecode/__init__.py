"""fusedecode: fused kernels for LLM decoding research.

One pass over a logits tensor gives per-token entropy, varentropy, self-certainty, log-sum-exp,
top-1 log-prob and DeepConf confidence (``logit_stats``), and the verification of a whole draft token
tree for speculative decoding (``verify_tree``, helpers in ``fusedecode.tree``), on four backends:
``cuda``, ``triton``, ``cpp`` and ``torch`` (the reference). ``linear_cross_entropy_entropy`` is the
chunked lm_head + cross-entropy + entropy (with gradients) behind SRGen, on ``triton`` and ``torch``.
Hugging Face integration lives in ``fusedecode.hf``. Set ``TRITON_INTERPRET=1`` before importing
fusedecode to run the Triton kernels on CPU tensors.
"""

from . import tree
from ._info import build_info, __version__
from .backends import available_backends
from .ops.linear_ce import linear_cross_entropy_entropy
from .ops.logit_stats import LogitStats, logit_stats
from .ops.verify_tree import TreeVerification, verify_tree

__all__ = ["logit_stats", "LogitStats", "verify_tree", "TreeVerification", "linear_cross_entropy_entropy", "tree",
           "available_backends", "build_info", "__version__"]
