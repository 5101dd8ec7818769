"""Draft token trees: the layout ``verify_tree`` uses and converters from other layouts.

A tree of N nodes is given by ``parents``: ``parents[0] == -1`` (node 0, the root, is the last token
already committed) and ``0 <= parents[i] < i`` for every other node, so node indices are a
topological order. Siblings are tried in increasing index order (the draft's priority).

Example::

    >>> import fusedecode.tree as tree
    >>> tokens, parents = tree.tree_from_paths([[5, 7], [5, 8], [6]], root_token=1)
    >>> tokens.tolist(), parents.tolist()
    ([1, 5, 7, 8, 6], [-1, 0, 1, 1, 0])
    >>> tree.tree_position_ids(parents, start=10).tolist()
    [10, 11, 12, 12, 11]
"""

import torch

from ._validation import INDEX_DTYPES, check_tensor, check_tree_parents, values_checkable

__all__ = [
    "tree_attention_mask",
    "tree_position_ids",
    "tree_depths",
    "tree_from_paths",
    "tree_from_next_sibling",
    "tree_to_next_sibling",
]


def _as_parents(parents, validate=True):
    """``parents`` as an int64 tensor; with ``validate``, a ``ValueError`` unless it is a tree
    (``parents[0] == -1``, ``0 <= parents[i] < i``: no cycle, self-parent or out-of-range parent)."""
    if not isinstance(parents, torch.Tensor):
        parents = torch.as_tensor(parents, dtype=torch.int64)
    check_tensor("parents", parents, INDEX_DTYPES)
    if parents.dim() not in (1, 2) or parents.shape[-1] < 1:
        raise ValueError(f"parents must have shape [N] or [B, N] with N >= 1, got {tuple(parents.shape)}")
    parents = parents.to(torch.int64)
    if validate and values_checkable(parents):
        check_tree_parents(parents)
    return parents


def _batched(parents, validate=True):
    parents = _as_parents(parents, validate)
    return (parents, True) if parents.dim() == 2 else (parents.unsqueeze(0), False)


def reachable_depths(parents):
    """Depth of every node the tree walk can reach from the root, -1 for the others; shape like
    ``parents``. Accepts invalid trees (it is what ``verify_tree(..., validate=False)`` uses): node i
    is a child of ``parents[i]`` only when ``0 <= parents[i] < i``, as in the fused walks, so a node
    with an out-of-range or later parent is unreachable, and so is everything below it. On a valid
    tree this is ``tree_depths``."""
    p, batched = _batched(parents, validate=False)
    n = p.shape[1]
    index = torch.arange(n, device=p.device).expand_as(p)
    linked = (p >= 0) & (p < index)
    # Pointer doubling: after k rounds every node knows its 2^k-th ancestor (the root points to
    # itself, a broken link to itself and is marked), so log2(N) rounds of gathers settle all.
    jump = torch.where(linked, p, index)
    jump[:, 0] = 0
    depth = linked.to(p.dtype)
    broken = ~linked
    broken[:, 0] = False
    for _ in range(max(n - 1, 1).bit_length()):
        depth = depth + depth.gather(1, jump)
        broken = broken | broken.gather(1, jump)
        jump = jump.gather(1, jump)
    depth = torch.where(broken, torch.full_like(depth, -1), depth)
    return depth if batched else depth[0]


def tree_depths(parents):
    """Depth of every node (root 0), shape like ``parents``. ``ValueError`` on an invalid tree."""
    _as_parents(parents)
    return reachable_depths(parents)


def tree_position_ids(parents, start=0):
    """Position ids of the tree's tokens for one forward pass: ``start + depth``.

    ``start`` is the position of the root (an int, or a tensor ``[B]`` for per-row trees/offsets).
    """
    depth = tree_depths(parents)
    if isinstance(start, torch.Tensor):
        start = start.to(depth.device, torch.int64)
        if start.dim() == 1:
            start = start.unsqueeze(-1)
    return depth + start


def tree_attention_mask(parents):
    """Boolean ``[N, N]`` (or ``[B, N, N]``) mask: node i attends to itself and its ancestors."""
    p, batched = _batched(parents)
    count, n = p.shape
    # Pointer doubling: row i starts as {i, parent(i)} and jump[i] as its parent (the root points to
    # itself); each round adds the row of jump[i] and doubles the jump, so after k rounds row i holds
    # every ancestor up to 2^k levels up. log2(N) rounds of gathers, not one update per node (this
    # runs once per step of tree speculation).
    jump = p.clone()
    jump[:, 0] = 0
    mask = torch.eye(n, dtype=torch.bool, device=p.device).repeat(count, 1, 1)
    mask.scatter_(2, jump.unsqueeze(-1), True)
    for _ in range(max(n - 2, 0).bit_length()):  # until 2^k >= N - 1, the deepest possible node
        mask |= mask.gather(1, jump.unsqueeze(-1).expand(count, n, n))
        jump = jump.gather(1, jump)
    return mask if batched else mask[0]


def tree_from_paths(paths, root_token=0):
    """Build ``(draft_tokens, parents)`` from token paths (Medusa / vLLM style).

    ``paths`` is a list of token sequences, each starting below the root; shared prefixes become
    shared nodes. Node order is first appearance, which is topological and keeps the order in which
    the paths list alternatives as the sibling priority. Returns int64 tensors ``[N]``.
    """
    tokens = [int(root_token)]
    parents = [-1]
    children = [{}]  # per node: token -> child node
    for path in paths:
        node = 0
        for token in path:
            token = int(token)
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                children.append({})
                children[node][token] = child
            node = child
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(parents, dtype=torch.int64)


def tree_from_next_sibling(first_child, next_sibling):
    """``parents`` from first-child / next-sibling arrays (SGLang's ``retrive_next_token`` and
    ``retrive_next_sibling``), shape ``[N]`` or ``[B, N]``, -1 for none.

    verify_tree tries siblings in increasing index order, so every sibling chain must be increasing;
    a tree that is not raises ``ValueError`` (renumber its nodes first).
    """
    first_child = torch.as_tensor(first_child, dtype=torch.int64).cpu()
    next_sibling = torch.as_tensor(next_sibling, dtype=torch.int64).cpu()
    if first_child.shape != next_sibling.shape or first_child.dim() not in (1, 2):
        raise ValueError("first_child and next_sibling must have the same shape [N] or [B, N]")
    batched = first_child.dim() == 2
    fc = first_child if batched else first_child.unsqueeze(0)
    ns = next_sibling if batched else next_sibling.unsqueeze(0)
    n = fc.shape[1]
    # The root has no siblings: a value there would be silently ignored by the walk below.
    bad_root = torch.nonzero(ns[:, 0] != -1)
    if bad_root.numel():
        b = int(bad_root[0, 0])
        raise ValueError(f"row {b}: the root (node 0) has no siblings, but next_sibling[0] is {int(ns[b, 0])}")
    parents = torch.full_like(fc, -2)
    parents[:, 0] = -1
    for b in range(fc.shape[0]):
        for node in range(n):
            child = int(fc[b, node])
            previous = node
            while child != -1:
                if not 0 <= child < n or parents[b, child] != -2:
                    raise ValueError(f"row {b}: node {child} is out of range or reached twice")
                if child <= previous:
                    raise ValueError(f"row {b}: siblings/children must have increasing indices "
                                     f"(node {child} after {previous}); renumber the tree")
                parents[b, child] = node
                previous = child
                child = int(ns[b, child])
    if (parents == -2).any():
        raise ValueError("some nodes are not reachable from the root")
    return parents if batched else parents[0]


def tree_to_next_sibling(parents):
    """Inverse of ``tree_from_next_sibling``: ``(first_child, next_sibling)`` arrays."""
    parents = _as_parents(parents).cpu()
    batched = parents.dim() == 2
    p = parents if batched else parents.unsqueeze(0)
    first_child = torch.full_like(p, -1)
    next_sibling = torch.full_like(p, -1)
    for b in range(p.shape[0]):
        last_child = {}
        for i in range(1, p.shape[1]):
            parent = int(p[b, i])
            if parent in last_child:
                next_sibling[b, last_child[parent]] = i
            else:
                first_child[b, parent] = i
            last_child[parent] = i
    return (first_child, next_sibling) if batched else (first_child[0], next_sibling[0])
