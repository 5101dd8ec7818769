"""One batch row's draft token tree: grown by the draft, pruned to what the target scores."""

import math
from typing import List, NamedTuple


class DraftRow(NamedTuple):
    """Where the draft distribution a node was expanded with lives: row ``row`` of the ``level``-th
    draft forward of the step (level 0 is the forward that fed the roots)."""

    level: int
    row: int


class PrunedTree(NamedTuple):
    """The part of a row's draft tree that the target scores, in topological order (siblings in
    drafting order): node 0 is the root; ``parents`` index into this order (-1 for the root),
    ``source`` is each node's index in the ``DraftTree``, ``depths`` its depth."""

    tokens: List[int]
    parents: List[int]
    source: List[int]
    depths: List[int]

    def drafted_tokens(self, node):
        """The drafted tokens from the root's child down to ``node``."""
        return [self.tokens[i] for i in path_to(self.parents, node)]


class DraftTree:
    """The draft tree of one row, grown level by level. Node 0 is the root (the last committed token,
    fed to the draft with the root distribution at ``root_draft_row``)."""

    def __init__(self, root_token, root_draft_row):
        self.tokens = [root_token]
        self.parents = [-1]
        self.depths = [0]
        self.cum_logprob = [0.0]
        self.draft_slot = [None]  # draft-cache slot of the nodes fed to the draft (the expanded ones)
        self.draft_row = {0: root_draft_row}  # node -> DraftRow of the distribution it was expanded with
        self.growing = True

    def __len__(self):
        return len(self.tokens)

    def add(self, token, parent, logprob):
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.cum_logprob.append(self.cum_logprob[parent] + logprob)
        self.draft_slot.append(None)
        return len(self.tokens) - 1

    def nodes_at(self, depth):
        return [i for i, d in enumerate(self.depths) if d == depth]

    def fed_slots(self, nodes):
        """Draft-cache slots of the longest prefix of ``nodes`` that was fed to the draft (the
        tokens after it are not in the draft's cache)."""
        slots = [self.draft_slot[node] for node in nodes]
        fed = next((i for i, slot in enumerate(slots) if slot is None), len(slots))
        return slots[:fed]

    def prune(self, max_nodes, whole_groups, min_logprob=-math.inf):
        """Keep at most ``max_nodes`` drafted nodes, best cumulative log-probability first, and none
        below ``min_logprob``.

        The kept set is closed under parents because a child never beats its parent (ties go to the
        shallower node). ``whole_groups`` trees (multi-draft: i.i.d. sibling groups) were already
        grown within budget and are kept whole.
        """
        drafted = list(range(1, len(self)))
        if not whole_groups:
            drafted = [i for i in drafted if self.cum_logprob[i] >= min_logprob]
            if len(drafted) > max_nodes:
                drafted.sort(key=lambda i: (-self.cum_logprob[i], self.depths[i], i))
                drafted = drafted[:max_nodes]
        kept = [0] + sorted(drafted, key=lambda i: (self.depths[i], i))
        new_index = {old: new for new, old in enumerate(kept)}
        parents = [-1] + [new_index[self.parents[old]] for old in kept[1:]]
        return PrunedTree(tokens=[self.tokens[i] for i in kept], parents=parents, source=kept,
                          depths=[self.depths[i] for i in kept])


def path_to(parents, node):
    """The nodes from the root's child down to ``node`` (the root excluded), in a tree given by
    each node's parent."""
    path = []
    while node > 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def branch_depth(parents, depths, node):
    """Depth of the deepest drafted node under ``node`` (itself included): how deep the branch the
    walk stopped in was drafted. Equal to ``depths[node]`` when the walk reached a leaf."""
    deepest = list(depths)
    for child in range(len(parents) - 1, 0, -1):  # children come after their parents
        deepest[parents[child]] = max(deepest[parents[child]], deepest[child])
    return deepest[node]
