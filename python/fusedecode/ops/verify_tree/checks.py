"""``verify_tree``'s argument checks (docs/errors.md), written with the primitives of
``_validation.py``: checks only; turning the arguments into the custom ops' inputs is ``op.py``'s
next step.
"""

import torch

from ..._validation import (FLOAT_DTYPES, INDEX_DTYPES, check_int, check_last_dim_contiguous, check_logits,
                            check_temperature, check_tensor, check_tree_parents, check_values_in_range,
                            values_checkable)


def check_seed(seed, batch):
    """verify_tree's ``seed``: None, a Python or NumPy integer in [0, 2^63) (out of range is an
    error, never a silent wrap), or an int64 tensor of shape [] or [B]."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        check_tensor("seed", seed, (torch.int64,), shape=[(), (batch,)])
        return
    check_int("seed", seed, 0, 2**63 - 1)


def check_verify_tree_args(target_logits, draft_tokens, parents, temperature, draft_probs, seed, validate):
    """``fusedecode.verify_tree``'s arguments (docs/errors.md). With ``validate`` (and outside
    tracing and capture) also the values: draft tokens in [-1, V) and a valid tree."""
    check_logits("target_logits", target_logits)
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must have shape [B, N, V], got {tuple(target_logits.shape)}")
    batch, nodes, vocab = target_logits.shape
    if nodes < 1:
        raise ValueError("target_logits must have N >= 1 nodes (node 0 is the root)")
    device = target_logits.device
    check_tensor("draft_tokens", draft_tokens, INDEX_DTYPES, shape=(batch, nodes), device=device,
                 device_of="target_logits")
    check_tensor("parents", parents, INDEX_DTYPES, shape=[(nodes,), (batch, nodes)])
    check_temperature(temperature, allow_zero=True)
    if draft_probs is not None and float(temperature) == 0:
        raise ValueError("draft_probs is given with temperature 0: greedy verification accepts the target's argmax "
                         "and never reads the draft distribution; pass draft_probs=None for greedy, or a temperature "
                         "> 0 for multi-draft sampling")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, FLOAT_DTYPES, dims=(3,), device=device, device_of="target_logits")
        if draft_probs.shape[:2] != (batch, nodes):
            raise ValueError(f"draft_probs must have shape [B, N, V] = {(batch, nodes, vocab)}, "
                             f"got {tuple(draft_probs.shape)}")
        if draft_probs.shape[2] != vocab:
            raise ValueError(f"draft_probs has V = {draft_probs.shape[2]} but target_logits have V = {vocab}")
        check_last_dim_contiguous("draft_probs", draft_probs)
    check_seed(seed, batch)
    if validate and values_checkable(parents) and values_checkable(draft_tokens):
        check_tree_parents(parents.to(torch.int64))
        if nodes > 1:
            check_values_in_range("draft_tokens", draft_tokens[:, 1:], -1, vocab, " (entry 0 is ignored)")
