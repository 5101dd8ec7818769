"""Tree speculative decoding for Hugging Face ``generate`` (draft/target collaboration).

A small draft model grows a token tree (EAGLE-2 style: each level expands the ``top_k`` most probable
frontier nodes by cumulative log-probability, one batched draft forward per level; LLMCad's fallback
stops growing when the best branch's cumulative probability falls below an adaptive threshold
alpha). The target scores the whole tree in one forward pass with a tree attention mask
(``fusedecode.tree``), ``fusedecode.verify_tree`` walks it in one fused pass over the target
logits, and both KV caches keep exactly the accepted path: no re-prefill.

The parts, in the order a step uses them:

- ``config``: ``TreeConfig`` and LLMCad's adaptive threshold.
- ``slot_cache``: which models can run exactly (their attention layout and 4D masks, sliding
  windows included, are ``fusedecode.hf.models.attention``), and a KV cache whose slots each row
  validates on its own (ragged acceptance).
- ``draft_tree``: one row's draft tree, and its pruning to what the target scores.
- ``drafter``: the draft model's side: feeding committed tokens, growing the trees.
- ``node_processors``: the user's logits processors at every tree node.
- ``step``: one draft / score / verify / commit step for every row (``TreeSpeculation``).
- ``generate``: the ``custom_generate`` entry point ``tree_speculative``.
"""

from .config import TreeConfig
from .generate import TreeSpeculativeOutput, tree_speculative

__all__ = ["TreeConfig", "TreeSpeculativeOutput", "tree_speculative"]
