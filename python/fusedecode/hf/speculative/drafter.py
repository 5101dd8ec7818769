"""The draft model's side of tree speculation: it takes in the committed tokens and grows every
row's token tree (EAGLE-2 style, LLMCad's fallback), one batched draft forward per tree level."""

import math
from typing import NamedTuple

import torch

from .config import TreeConfig
from .draft_tree import DraftRow, DraftTree, path_to


class Drafting(NamedTuple):
    """How the draft proposes children during one ``generate`` call."""

    config: TreeConfig
    multi_draft: bool  # ``top_k`` i.i.d. samples per node (SpecInfer) instead of the top-k tokens
    temperature: float  # the draft's temperature: the sampling temperature, 1 when greedy
    target_vocab: int  # draft distributions are put over the target's vocabulary
    # End-of-sequence tokens: a drafted one is a leaf (the row stops there, so nothing drafted after
    # it could be emitted; growing past it only costs draft forwards).
    stop_tokens: frozenset = frozenset()

    def distribution(self, logits):
        """Draft log-probabilities over the target's vocabulary (a draft with a padded or smaller
        vocabulary proposes only ids both models have)."""
        vocab = logits.shape[-1]
        if vocab > self.target_vocab:
            logits = logits[..., :self.target_vocab]
        elif vocab < self.target_vocab:
            logits = torch.nn.functional.pad(logits, (0, self.target_vocab - vocab), value=-math.inf)
        return torch.log_softmax(logits / self.temperature, dim=-1)

    def propose(self, logprobs):
        """Children proposals for every row of one draft forward, as Python lists (one host sync per
        level, not one per node): the top-k tokens, or ``top_k`` i.i.d. samples in multi-draft mode,
        with their draft log-probabilities."""
        if self.multi_draft:
            tokens = torch.multinomial(logprobs.exp(), self.config.top_k, replacement=True)
        else:
            tokens = logprobs.topk(min(self.config.top_k, logprobs.shape[-1])).indices
        return tokens.tolist(), logprobs.gather(1, tokens).tolist()


class DraftLevels:
    """The draft distributions of one step, one ``[rows, V]`` tensor per draft forward (level 0: the
    roots), and the children each of their rows proposes."""

    def __init__(self, drafting):
        self.drafting = drafting
        self.distributions = []
        self.proposals = []

    def add(self, logits):
        """Records the ``[rows, V]`` logits of a draft forward; returns its level."""
        distribution = self.drafting.distribution(logits)
        self.distributions.append(distribution)
        self.proposals.append(self.drafting.propose(distribution))
        return len(self.distributions) - 1

    def children_of(self, draft_row):
        """``(token, logprob)`` pairs proposed at ``draft_row``."""
        tokens, logprobs = self.proposals[draft_row.level]
        return zip(tokens[draft_row.row], logprobs[draft_row.row])

    def probs(self, pruned_trees, trees, vocab):
        """``[B, N, V]`` draft probabilities for SpecInfer verification: row n holds the distribution
        node n's children were drawn from (zeros for nodes without children), one gather per level."""
        device = self.distributions[0].device
        probs = torch.zeros(len(pruned_trees), max(len(p.tokens) for p in pruned_trees), vocab, dtype=torch.float32,
                            device=device)
        by_level = {}
        for b, pruned in enumerate(pruned_trees):
            for node, source in enumerate(pruned.source):
                draft_row = trees[b].draft_row.get(source)
                if draft_row is not None:
                    rows, nodes, draft_rows = by_level.setdefault(draft_row.level, ([], [], []))
                    rows.append(b)
                    nodes.append(node)
                    draft_rows.append(draft_row.row)
        for level, (rows, nodes, draft_rows) in by_level.items():
            probs[torch.tensor(rows, device=device), torch.tensor(nodes, device=device)] = \
                self.distributions[level][torch.tensor(draft_rows, device=device)].exp()
        return probs


class Drafter:
    """The draft model's slot cache and the growth of the trees.

    ``feed`` gives the draft the committed tokens it has not seen (the last of each row is the next
    tree's root), ``grow`` builds every row's tree from there, ``keep_accepted`` cuts the draft's
    cache to the accepted paths.
    """

    def __init__(self, cache, drafting, input_vocab):
        self.cache, self.drafting, self.config = cache, drafting, drafting.config
        self.input_vocab = input_vocab  # ids the draft's embedding has
        self.tree_start = 0  # first cache slot of the current trees

    def feed(self, pending, committed):
        """Feeds each row b its ``pending[b]`` committed tokens (ending at position ``committed[b] - 1``);
        returns the draft's ``[B, V]`` logits at each row's last token, the root."""
        batch, width = len(pending), max(len(chain) for chain in pending)
        # Right-aligned, so that every row's root is the last column: only its logits are computed.
        tokens = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        token_valid = torch.zeros(batch, width, dtype=torch.bool)
        for b, chain in enumerate(pending):
            tokens[b, width - len(chain):] = torch.tensor(chain)
            positions[b, width - len(chain):] = torch.arange(committed[b] - len(chain), committed[b])
            token_valid[b, width - len(chain):] = True
        # Ids the draft's embedding lacks (a draft with a smaller padded vocabulary) reach it as id 0;
        # it never proposes them, and verification stays exact whatever the draft sees.
        tokens = torch.where(tokens < self.input_vocab, tokens, torch.zeros_like(tokens))
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        new_mask = (causal[None] & token_valid[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        device = self.cache.valid.device
        root_logits = self.cache.forward(tokens.to(device), token_valid.to(device), positions.to(device),
                                         new_mask.to(device), last=1)[:, -1]
        self.tree_start = self.cache.length
        return root_logits

    def grow(self, roots, root_logits, alphas, root_positions):
        """Every row's tree from its root token, grown level by level; returns the trees and the
        step's ``DraftLevels``.

        Level d expands the fed nodes of depth d - 1 (their draft distributions are known): top-k
        children, or ``top_k`` i.i.d. samples in multi-draft mode. Then the ``top_k`` most probable
        new nodes are fed to the draft so the next level can expand them, unless the best of them is
        below the row's alpha (LLMCad's fallback) or can no longer make the final ``max_nodes`` cut.
        """
        levels = DraftLevels(self.drafting)
        root_level = levels.add(root_logits)
        trees = [DraftTree(root, DraftRow(root_level, b)) for b, root in enumerate(roots)]
        for depth in range(1, self.config.max_depth + 1):
            for tree in trees:
                self._expand(tree, depth - 1, levels)
            if depth == self.config.max_depth:
                break
            feeds = [self._frontier_to_feed(tree, depth, alpha) for tree, alpha in zip(trees, alphas)]
            if not any(feeds):
                break
            self._feed_frontier(trees, feeds, levels, root_positions + depth)
        return trees, levels

    def keep_accepted(self, fed_slots):
        """Keep the context before the trees and, per row, the draft slots of its accepted tokens."""
        self.cache.keep_prefix_and(self.tree_start, fed_slots)

    def _expand(self, tree, depth, levels):
        """Adds the proposed children of the fed nodes of ``depth``."""
        if not tree.growing:
            return
        config = self.config
        for node in [n for n in tree.nodes_at(depth) if n in tree.draft_row]:
            if self.drafting.multi_draft and len(tree) - 1 + config.top_k > config.max_nodes:
                tree.growing = False  # i.i.d. sibling groups are kept whole or not drafted
                return
            for token, logprob in levels.children_of(tree.draft_row[node]):
                if math.isfinite(logprob):
                    tree.add(token, node, logprob)

    def _frontier_to_feed(self, tree, depth, alpha):
        """The nodes of ``depth`` to feed to the draft (the ``top_k`` most probable, end-of-sequence
        tokens excluded), or none: the row stops growing when its best branch is below ``alpha`` or
        cannot make the final cut (``max_nodes``, ``min_prob``)."""
        if not tree.growing:
            return []
        config = self.config
        stop_tokens = self.drafting.stop_tokens
        candidates = [node for node in tree.nodes_at(depth) if tree.tokens[node] not in stop_tokens]
        frontier = sorted(candidates, key=lambda i: (-tree.cum_logprob[i], i))[:config.top_k]
        if frontier:
            best = tree.cum_logprob[frontier[0]]
            at_least_as_good = sum(1 for c in tree.cum_logprob[1:] if c >= best)
            # A top-k tree is pruned to its max_nodes best nodes above min_prob: a branch that
            # cannot make that cut is not worth a draft forward.
            cannot_make_the_cut = not self.drafting.multi_draft and (at_least_as_good >= config.max_nodes
                                                                     or math.exp(best) < config.min_prob)
            if math.exp(best) < alpha or cannot_make_the_cut:
                frontier = []
        tree.growing = bool(frontier)
        return frontier

    def _feed_frontier(self, trees, feeds, levels, positions):
        """One draft forward over the ``feeds[b]`` nodes of every row, at ``positions [B]``: each node
        attends the context before the trees and its own fed ancestors. The tokens and masks are
        built on the host and copied to the device once."""
        batch, width = len(trees), max(len(feed) for feed in feeds)
        device = self.cache.valid.device
        tokens = torch.zeros(batch, width, dtype=torch.long)
        token_valid = torch.zeros(batch, width, dtype=torch.bool)
        past_allowed = torch.zeros(batch, width, self.cache.length, dtype=torch.bool)
        past_allowed[:, :, :self.tree_start] = True
        first_slot, level = self.cache.length, len(levels.distributions)
        for b, (tree, feed) in enumerate(zip(trees, feeds)):
            for j, node in enumerate(feed):
                tokens[b, j] = tree.tokens[node]
                token_valid[b, j] = True
                past_allowed[b, j, [tree.draft_slot[a] for a in path_to(tree.parents, node)[:-1]]] = True
                tree.draft_slot[node] = first_slot + j
                tree.draft_row[node] = DraftRow(level, b * width + j)
        eye = torch.eye(width, dtype=torch.bool, device=device)[None].expand(batch, -1, -1)
        logits = self.cache.forward(tokens.to(device), token_valid.to(device), positions[:, None].expand(batch, width)
                                    .to(device), eye, past_allowed.to(device))
        levels.add(logits.reshape(batch * width, -1))
