"""One step of tree speculation for every row of the batch: the draft grows each row's tree, the
target scores all of them in one forward pass, ``verify_tree`` walks them in one fused pass over
the target's logits, and each row commits what was accepted; both KV caches then keep exactly the
accepted paths (no re-prefill)."""

import math
from dataclasses import dataclass, field
from typing import List, NamedTuple

import torch

from ...tree import tree_attention_mask
from ...ops.verify_tree import verify_tree
from .config import next_alpha
from .draft_tree import branch_depth
from .node_processors import process_tree_logits


@dataclass
class RowState:
    """One batch row across the steps."""

    ids: torch.Tensor  # every committed id: what plain decoding's processors and stopping criteria see
    committed: int  # real tokens committed, the root of the next tree included
    pending: List[int]  # committed tokens not yet fed to the draft; the last is the next tree's root
    alpha: float  # LLMCad's fallback threshold
    emitted: List[int] = field(default_factory=list)  # the caller's tokens, cut by the stopping criteria
    finished: bool = False

    @classmethod
    def from_prompt(cls, prompt_ids, prompt_valid, alpha):
        return cls(ids=prompt_ids, committed=int(prompt_valid.sum()), pending=prompt_ids[prompt_valid].tolist(),
                   alpha=float(alpha))


class PendingChain(NamedTuple):
    """Committed tokens ``[B, L]`` not yet in the target's cache, fed causally before the next tree."""

    tokens: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_prompt(cls, input_ids, prompt_valid):
        """The prompt but its last token (the first tree's root), or None for a one-token prompt. The
        prompt is not prefilled on its own: the first target forward scores it with the first tree."""
        if input_ids.shape[1] <= 1:
            return None
        valid = prompt_valid[:, :-1]
        return cls(input_ids[:, :-1], valid, (valid.long().cumsum(1) - 1).clamp(min=0))


class TreeBatch(NamedTuple):
    """Every row's pruned tree as padded ``[B, N]`` device tensors, as the target's tree forward and
    ``verify_tree`` take them: ``tokens`` (-1 for padding nodes; entry 0 is the root), ``parents``,
    ``valid`` (real nodes, the root included), ``positions`` and the ``[B, N, N]`` tree attention
    ``mask``."""

    tokens: torch.Tensor
    parents: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_pruned(cls, pruned_trees, root_positions, device):
        nodes = max(len(pruned.tokens) for pruned in pruned_trees)
        # Padding nodes: token -1, parent 0 and a harmless depth 1. Built as lists, then one tensor each.
        tokens = [pruned.tokens + [-1] * (nodes - len(pruned.tokens)) for pruned in pruned_trees]
        parent_rows = [pruned.parents + [0] * (nodes - len(pruned.parents)) for pruned in pruned_trees]
        depths = [pruned.depths + [1] * (nodes - len(pruned.depths)) for pruned in pruned_trees]
        tokens, parents = torch.tensor(tokens, dtype=torch.long), torch.tensor(parent_rows, dtype=torch.long)
        valid = tokens >= 0
        valid[:, 0] = True
        positions = torch.as_tensor(root_positions, dtype=torch.long)[:, None] + torch.tensor(depths, dtype=torch.long)
        # Built on the host: the tree helper validates its input, which on a GPU would cost a sync.
        mask = tree_attention_mask(parents)
        return cls(tokens.to(device), parents.to(device), valid.to(device), positions.to(device), mask.to(device))


class RowWalk(NamedTuple):
    """``verify_tree``'s walk of one row: ``accepted`` drafted tokens, ``nodes`` the accepted path in
    the pruned tree (the root first), ``tokens`` what the row commits (the accepted tokens, then the
    bonus or correction token)."""

    accepted: int
    nodes: List[int]
    tokens: List[int]


def row_walks(verification):
    """The ``RowWalk`` of every row of a ``TreeVerification``, with one copy to the host."""
    width = verification.accepted_nodes.shape[1]
    host = torch.cat([verification.num_accepted[:, None], verification.accepted_nodes, verification.output_tokens],
                     dim=1).cpu()
    counts, nodes, tokens = host.split([1, width, width], dim=1)
    return [RowWalk(count, row_nodes[:count + 1], row_tokens[:count + 1])
            for count, row_nodes, row_tokens in zip(counts[:, 0].tolist(), nodes.tolist(), tokens.tolist())]


class Verifier:
    """The target model's side: its slot cache, the committed tokens it has not seen (``chain``, a
    ``PendingChain`` or None), the generate loop's logits processors, and verification."""

    def __init__(self, cache, chain, logits_processor, do_sample):
        self.cache, self.chain, self.logits_processor, self.do_sample = cache, chain, logits_processor, do_sample
        self.tree_start = 0  # first cache slot of the current trees

    def score(self, trees):
        """The target's float32 logits ``[B, N, V]`` at every node of ``trees`` (a ``TreeBatch``),
        from one forward pass with the tree attention mask."""
        tokens, mask, nodes = trees.tokens.clamp(min=0), trees.mask, trees.tokens.shape[1]
        if self.chain is None:
            logits = self.cache.forward(tokens, trees.valid, trees.positions, mask, last=nodes)
        else:
            logits = self._score_after_chain(tokens, trees, mask)
            self.chain = None
        self.tree_start = self.cache.length - nodes
        return logits

    def _score_after_chain(self, tokens, trees, tree_mask):
        """The tree forward preceded by the pending chain: the chain is causal, every tree node also
        attends the whole (valid) chain."""
        chain = self.chain
        batch, length = chain.tokens.shape
        nodes, device = tokens.shape[1], tokens.device
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))[None] & chain.valid[:, None, :]
        eye = torch.eye(length, dtype=torch.bool, device=device)[None]
        top = torch.cat([causal | eye, torch.zeros(batch, length, nodes, dtype=torch.bool, device=device)], dim=2)
        bottom = torch.cat([chain.valid[:, None, :].expand(batch, nodes, length), tree_mask], dim=2)
        return self.cache.forward(torch.cat([chain.tokens, tokens], 1), torch.cat([chain.valid, trees.valid], 1),
                                  torch.cat([chain.positions, trees.positions], 1), torch.cat([top, bottom], 1),
                                  last=nodes)

    def process(self, logits, row_ids, pruned_trees):
        """The logits processors at every node, as plain decoding would run them there."""
        return process_tree_logits(self.logits_processor, logits, row_ids, pruned_trees)

    def verify(self, scores, trees, draft_probs):
        """One fused ``verify_tree`` over every row; the processors already applied the temperature.
        The trees are built by this loop, so the value checks (a host sync each on a GPU) are skipped."""
        return row_walks(verify_tree(scores, trees.tokens, trees.parents, temperature=1.0 if self.do_sample else 0.0,
                                     draft_probs=draft_probs, validate=False))

    def keep_accepted(self, paths):
        """Keep the context before the trees and, per row, the accepted path's nodes."""
        self.cache.keep_prefix_and(self.tree_start, [[self.tree_start + node for node in path] for path in paths])


class TreeSpeculation:
    """The state of one ``tree_speculative`` call: every row's ``RowState``, the ``Drafter`` and the
    ``Verifier``, the stopping criteria and the caller's ``TokenStream`` (row 0 is streamed), and the
    counts behind ``num_accepted`` and ``mean_accepted_length``."""

    def __init__(self, rows, config, drafter, verifier, stopping_criteria, stream):
        self.rows, self.config, self.drafter, self.verifier = rows, config, drafter, verifier
        self.stopping_criteria, self.stream = stopping_criteria, stream
        self.accepted_per_step = []  # per step, per row: drafted tokens accepted (-1: row finished)
        self.tokens_emitted = 0
        self.row_forwards = 0  # target forwards, counted per row still generating

    @property
    def finished(self):
        return all(row.finished for row in self.rows)

    @property
    def mean_accepted_length(self):
        return self.tokens_emitted / max(self.row_forwards, 1)

    def step(self):
        """Draft, score, verify and commit once for every row."""
        rows, multi_draft = self.rows, self.drafter.drafting.multi_draft
        root_logits = self.drafter.feed([row.pending for row in rows], [row.committed for row in rows])
        root_positions = torch.tensor([row.committed for row in rows]) - 1
        trees, levels = self.drafter.grow([row.pending[-1] for row in rows], root_logits, [row.alpha for row in rows],
                                          root_positions)
        floor = math.log(self.config.min_prob) if self.config.min_prob > 0 else -math.inf
        pruned = [tree.prune(self.config.max_nodes, multi_draft, floor) for tree in trees]
        batch = TreeBatch.from_pruned(pruned, root_positions, rows[0].ids.device)
        logits = self.verifier.score(batch)
        self.row_forwards += sum(not row.finished for row in rows)
        scores = self.verifier.process(logits, [row.ids for row in rows], pruned)
        draft_probs = levels.probs(pruned, trees, scores.shape[-1]) if multi_draft else None
        walks = self.verifier.verify(scores, batch, draft_probs)
        self.accepted_per_step.append([-1 if row.finished else walk.accepted for row, walk in zip(rows, walks)])
        fed_slots = [self._commit(index, walk, pruned[index], trees[index]) for index, walk in enumerate(walks)]
        self.verifier.keep_accepted([walk.nodes for walk in walks])
        self.drafter.keep_accepted(fed_slots)

    def _commit(self, index, walk, pruned, tree):
        """Row ``index`` commits its walk's tokens and emits what its stopping criteria allow; returns
        the draft-cache slots to keep (the accepted tokens the draft was already fed)."""
        row = self.rows[index]
        fed_slots = tree.fed_slots([pruned.source[node] for node in walk.nodes[1:]])
        row.pending = walk.tokens[len(fed_slots):]
        row.ids = torch.cat([row.ids, torch.tensor(walk.tokens, dtype=row.ids.dtype, device=row.ids.device)])
        row.committed += len(walk.tokens)
        if not row.finished:
            self._emit(index, row, walk.tokens)
        drafted_depth = branch_depth(pruned.parents, pruned.depths, walk.nodes[-1])
        row.alpha = next_alpha(row.alpha, walk.accepted, drafted_depth, self.config)
        return fed_slots

    def _emit(self, index, row, new_tokens):
        """Appends tokens one at a time, as plain decoding would, until a stopping criterion fires
        (``row.ids`` already ends with all of ``new_tokens``)."""
        before, base = len(row.emitted), row.ids.shape[0] - len(new_tokens)
        for i, token in enumerate(new_tokens):
            row.emitted.append(token)
            if len(self.stopping_criteria) and bool(self.stopping_criteria(row.ids[None, :base + i + 1], None).any()):
                row.finished = True
                break
        self.tokens_emitted += len(row.emitted) - before
        if index == 0:
            self.stream.put(row.emitted[before:])
