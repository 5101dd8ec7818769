"""Hugging Face integration of fusedecode (needs ``transformers``).

- ``UncertaintyProcessor``: drop-in ``LogitsProcessor`` recording per-token entropy, varentropy,
  self-certainty, ... for every row at every step (one fused op per step, no ``[B, V]`` history).
- ``ConfidenceStopping``: DeepConf's online early stop on the sliding mean of top-k confidence (the
  stopping step emits EOS).
- ``ReflectionInsertion``: inserts a token sequence (a self-reflection prompt) where a trigger fires
  (SRGen's entropy rule, or a step measure at a step's end; ``fusedecode.reflection``), a logits
  processor + stopping criteria pair for plain ``generate`` and ``srgen``.
- DeepConf's trace measures, threshold calibration and votes (``lowest_group_confidence``,
  ``confidence_threshold``, ``deepconf_vote``, ...) and ``best_of_n`` (Borda voting with
  self-certainty, Kang et al.): from the transformers-free ``fusedecode.confidence``, re-exported.
- ``tree_speculative`` / ``TreeConfig``: tree speculative decoding with a draft model, verified by
  ``fusedecode.verify_tree`` (``model.generate(..., custom_generate=tree_speculative, draft_model=...)``);
  the package ``fusedecode.hf.speculative``. Its ``return_dict_in_generate`` output is a
  ``TreeSpeculativeOutput``.
- ``srgen``, ``SRGenConfig``: SRGen entropy-triggered corrective decoding, a ``custom_generate`` callable;
  the package ``fusedecode.hf.correction``. Its ``return_dict_in_generate`` output is an ``SRGenOutput``.
- Both ``custom_generate`` callables take a streamer as ``token_streamer=`` (``generate`` keeps its own
  ``streamer=`` from them).
- ``deepconf_generate`` / ``DeepConfOutput``: DeepConf in one ``generate`` call with the options of the
  Hub's DeepConf ``custom_generate`` repositories (online stop, confidence output, warm-up
  calibration); the module ``fusedecode.hf.deepconf``.
- ``score``: per-token statistics of given sequences under teacher forcing (offline Best-of-N,
  DeepConf, perplexity) through the model's own head, without ``[B, T, V]`` logits
  (``fusedecode.linear_logit_stats``); the module ``fusedecode.hf.scoring``.
- ``fusedecode.hf.models``: what the integration knows about model architectures (the output head and
  its logit transform, final hidden states, cache, attention layout and sliding windows,
  ``logits_to_keep``), with the architecture table ``fusedecode.hf.models.architectures``.
- ``bundled_model_path``: the small arithmetic target/draft models shipped with fusedecode (trained by
  ``fusedecode.demo.train_bundled``).
"""

import os

from ..confidence import (best_of_n, bottom_group_confidence, confidence_threshold, deepconf_vote, filter_top,
                          group_confidences, lowest_group_confidence, majority_vote, mean_confidence, tail_confidence,
                          weighted_majority_vote)
from .correction import SRGenConfig, SRGenOutput, srgen
from .deepconf import DeepConfOutput, deepconf_generate
from .processors import ConfidenceStopping, ConfidenceStopProcessor, UncertaintyProcessor
from .reflection import ReflectionInsertion, ReflectionProcessor
from .scoring import score
from .speculative import TreeConfig, TreeSpeculativeOutput, tree_speculative

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED = ("target", "draft")


def bundled_model_path(name="target"):
    """Folder of a bundled model (``"target"`` or ``"draft"``), loadable with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` offline."""
    if name not in BUNDLED:
        raise ValueError(f"name must be one of {BUNDLED}, got {name!r}")
    path = os.path.join(ASSETS, f"arithmetic-{name}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"bundled model {name!r} is missing at {path}; "
                                "run `python -m fusedecode.demo.train_bundled` to create it")
    return path


__all__ = ["UncertaintyProcessor", "ConfidenceStopping", "ConfidenceStopProcessor", "ReflectionInsertion",
           "ReflectionProcessor", "best_of_n", "group_confidences",
           "mean_confidence", "tail_confidence", "bottom_group_confidence", "lowest_group_confidence",
           "confidence_threshold", "filter_top", "weighted_majority_vote", "majority_vote", "deepconf_vote",
           "bundled_model_path", "TreeConfig", "TreeSpeculativeOutput", "tree_speculative", "SRGenConfig",
           "SRGenOutput", "srgen", "deepconf_generate", "DeepConfOutput", "score"]
