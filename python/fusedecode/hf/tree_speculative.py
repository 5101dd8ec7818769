"""Tree speculative decoding for Hugging Face ``generate`` (draft/target collaboration).

A small draft model grows a token tree (EAGLE-2 style: each level expands the ``top_k`` most probable
frontier nodes by cumulative log-probability, one batched draft forward per level; LLMCad's fallback
stops growing when the best branch's cumulative probability falls below an adaptive threshold
alpha). The target scores the whole tree in one forward pass with a tree attention mask
(``fusedecode.tree``), ``fusedecode.verify_tree`` walks it in one fused pass over the target
logits, and both KV caches keep exactly the accepted path: no re-prefill.

Each row of the batch keeps its own tree and accepts its own number of tokens (ragged acceptance).
The KV caches therefore hold per-row validity masks: slots of rejected nodes are compacted away
after each verification, and every forward gets an explicit 4D additive attention mask and explicit
position ids, which any decoder-only HF model built on ``create_causal_mask`` accepts. Sliding-window
layers get the window in that mask (per layer type where a model mixes them), by the rule the
model's own mask follows: a query at position p attends keys at positions > p - window.
"""

import copy
import functools
import inspect
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .._validation import ArgumentTypeError, check_float, check_int
from ..tree import tree_attention_mask, tree_position_ids
from ..verify_tree import verify_tree
from ._transformers_compat import cache_keyword, decoder_module
from .processors import UncertaintyProcessor

__all__ = ["TreeConfig", "tree_speculative"]

SAMPLING_MODES = ("target_only", "multi_draft")


@dataclass
class TreeConfig:
    """How the draft grows its token tree in ``tree_speculative``.

    Args:
        max_depth: drafted tokens on the longest branch (tree depth, root excluded).
        top_k: children per expanded node, and nodes expanded per level.
        max_nodes: drafted tokens per tree (root excluded); the target scores ``max_nodes + 1`` rows.
        alpha: initial fallback threshold: a row stops growing its tree when the most probable
            frontier branch has cumulative draft probability below alpha.
        adaptive: LLMCad's update after each verification: halve alpha when every drafted token on
            the accepted branch was accepted (the walk reached a leaf), else set alpha to the
            fraction of the branch that was rejected (``1 - accepted / drafted depth``).
        min_alpha: floor for the halving, so alpha stays meaningful after long accepted runs (an
            alpha already below it, such as 0 for "never stop early", is left as it is).
        sampling: when sampling (``do_sample=True``), how children are drafted and verified.
            ``"target_only"``: the top-k children of the draft (any tree is lossless; verification
            samples the target only). ``"multi_draft"``: each expanded node gets ``top_k`` children
            drawn i.i.d. from the draft's distribution and verification is SpecInfer's multi-draft
            rejection sampling with the draft probabilities (sibling groups are kept or dropped
            whole, as the i.i.d. assumption requires). Greedy decoding ignores this field.
    """

    max_depth: int = 6
    top_k: int = 4
    max_nodes: int = 32
    alpha: float = 0.02
    adaptive: bool = True
    min_alpha: float = 1e-4
    sampling: str = "target_only"

    def __post_init__(self):
        for name in ("max_depth", "top_k", "max_nodes"):
            check_int(f"TreeConfig.{name}", getattr(self, name), 1)
        for name in ("alpha", "min_alpha"):
            check_float(f"TreeConfig.{name}", getattr(self, name), 0.0, 1.0)
        if not isinstance(self.adaptive, bool):
            raise ArgumentTypeError(f"TreeConfig.adaptive must be a bool, got {self.adaptive!r}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"TreeConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")


@functools.lru_cache(maxsize=None)
def _output_class():
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    @dataclass
    class TreeSpeculativeOutput(GenerateDecoderOnlyOutput):
        """``generate`` output of ``tree_speculative`` with ``return_dict_in_generate=True``.

        ``num_accepted``: ``[steps, B]`` int64, drafted tokens accepted by each verification (-1 for
        rows already finished). ``mean_accepted_length``: tokens emitted per row per target forward
        (accepted drafts plus the bonus/correction token), over the rows still generating.
        ``past_key_values`` is None: the caches hold per-row holes only this loop understands.
        """

        num_accepted: Optional[torch.LongTensor] = None
        mean_accepted_length: Optional[float] = None

    return TreeSpeculativeOutput


class _SlotCache:
    """A DynamicCache whose slots may be invalid per row (padding, dummy queries, compacted holes).

    ``valid[b, s]`` says whether slot s of row b holds a real token's key/value, ``positions[b, s]``
    the position it was fed at. Every forward gets a 4D additive mask built from them (one per layer
    type, each with its sliding window), so the model never attends an invalid slot.
    """

    def __init__(self, model, batch, device, layout=None):
        from transformers import DynamicCache

        self.model = model
        self.layout = _check_model(model, "the model") if layout is None else layout
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # No config: every layer keeps every slot (a config would give sliding layers a cache that
        # drops old slots, which the slot bookkeeping cannot follow; the mask applies the window).
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @property
    def length(self):
        return self.valid.shape[1]

    def forward(self, tokens, token_valid, positions, new_mask, past_allowed=None, last=0):
        """Run the model on ``tokens [B, q]`` at ``positions [B, q]`` and append them to the cache;
        returns float32 logits of the last ``last`` tokens (0: all), so a long prompt never turns
        into ``[B, q, V]`` logits.

        ``new_mask [B, q, q]``: which new tokens each new token attends (must include itself, so no
        query row is fully masked). ``past_allowed [B, q, S]``: which cached slots each new token
        attends (default: every valid slot).
        """
        batch, count = tokens.shape
        if past_allowed is None:
            past_allowed = self.valid[:, None, :].expand(batch, count, self.length)
        allowed = torch.cat([past_allowed & self.valid[:, None, :], new_mask], dim=2)
        key_positions = torch.cat([self.positions, positions], dim=1)
        extra = {"logits_to_keep": last} if last and self.takes_logits_to_keep else {}
        outputs = self.model(input_ids=tokens, attention_mask=self.layout.masks(allowed, positions, key_positions),
                             position_ids=positions, use_cache=True, return_dict=True,
                             **{self.layout.cache_keyword: self.cache}, **extra)
        self.valid = torch.cat([self.valid, token_valid], dim=1)
        self.positions = key_positions
        logits = outputs.logits if not last or extra else outputs.logits[:, -last:]
        return logits.float()

    def keep(self, keep):
        """Keep the slots where ``keep [B, S]`` is True, compacted to the left in slot order."""
        keep = keep & self.valid
        kept = keep.sum(1)
        width = int(kept.max()) if keep.numel() else 0
        # A stable sort puts each row's kept slots first, in their original order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        for layer in self.cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            if layer.keys.shape[2] != self.length:
                raise RuntimeError(f"a cache layer holds {layer.keys.shape[2]} slots where {self.length} were fed "
                                   f"({type(layer).__name__} drops slots); tree_speculative needs every slot kept")
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = order[:, None, :, None].expand(-1, heads, -1, dim)
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
        self.valid = torch.arange(width, device=keep.device)[None, :] < kept[:, None]
        self.positions = self.positions.gather(1, order)


FULL, SLIDING = "full_attention", "sliding_attention"
# Attention implementations that read an explicit 4D mask (flash attention only takes padding).
MASKED_ATTENTION = ("eager", "sdpa")
# Decoders that take one prepared mask per layer type: ``if not isinstance(... attention_mask, dict)``.
_TAKES_MASK_MAPPING = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")


class _AttentionLayout:
    """Which attention masks a model's layers read, and how to hand them over.

    Per layer type ("full_attention", "sliding_attention") the window (None: full causal), from the
    same fields transformers' own masks and caches use: ``layer_types`` where the config has them
    (Gemma2/3, Cohere2, Qwen2/3 with ``max_window_layers``, Qwen2-MoE in 5.x), otherwise
    ``sliding_window`` for every layer (Mistral, Mixtral, Phi3, ...; not when ``use_sliding_window``
    is False). transformers' window rule is ``key index > query index - window``, i.e. a query at
    position p attends the keys at positions p - window + 1 .. p. A model with one layer type gets
    one 4D mask; a model mixing them gets a dict keyed by layer type, which the decoders that mix
    them accept as prepared masks. Raises ValueError for what cannot be expressed by such masks.
    """

    def __init__(self, model, name):
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in MASKED_ATTENTION:
            raise ValueError(f"tree_speculative passes a 4D tree attention mask, which only the {MASKED_ATTENTION} "
                             f"attention implementations read; {name} uses {implementation!r} (load it with "
                             "attn_implementation='sdpa')")
        if getattr(text_config, "attention_chunk_size", None):
            raise ValueError(f"tree_speculative does not support chunked attention ({name} has attention_chunk_size="
                             f"{text_config.attention_chunk_size})")
        self.cache_keyword = cache_keyword(model)
        if self.cache_keyword is None:
            raise ValueError(f"tree_speculative needs a model whose forward takes a key/value cache; {name} "
                             f"({type(model).__name__}) takes neither cache nor past_key_values")
        window = getattr(text_config, "sliding_window", None)
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types is None:
            uses_window = window is not None and getattr(text_config, "use_sliding_window", True) is not False
            layer_types = [SLIDING if uses_window else FULL] * text_config.num_hidden_layers
        unknown = sorted(set(layer_types) - {FULL, SLIDING})
        if unknown:
            raise ValueError(f"tree_speculative supports full and sliding-window attention layers; {name} has "
                             f"layer types {unknown}")
        if SLIDING in layer_types and not (isinstance(window, int) and window >= 1):
            raise ValueError(f"{name} has sliding-window layers but sliding_window={window!r}")
        self.windows = {kind: (window if kind == SLIDING else None) for kind in (FULL, SLIDING) if kind in layer_types}
        self.dtype = model.dtype
        if len(self.windows) > 1 and not _takes_mask_mapping(model):
            raise ValueError(f"{name} ({type(model).__name__}) mixes full and sliding-window layers but its decoder "
                             "takes a single attention mask, so tree_speculative cannot give each layer its window")

    def masks(self, allowed, query_positions, key_positions):
        """The model's ``attention_mask`` from ``allowed [B, q, S]``: a 4D additive mask ``[B, 1, q, S]``,
        or a dict of them by layer type."""
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        dtype = self.dtype
        masks = {}
        for kind, window in self.windows.items():
            attend = allowed if window is None else allowed & (distance < window)
            mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
            masks[kind] = mask.masked_fill_(~attend, torch.finfo(dtype).min)[:, None]
        return next(iter(masks.values())) if len(masks) == 1 else masks


def _takes_mask_mapping(model):
    decoder = decoder_module(model)
    try:
        source = inspect.getsource(type(decoder if decoder is not None else model).forward)
    except (OSError, TypeError):
        return False
    return bool(_TAKES_MASK_MAPPING.search(source))


def _check_model(model, name):
    """Refuse, before any forward, what tree_speculative cannot run exactly; returns the model's
    attention layout."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"tree_speculative supports decoder-only models; {name} is encoder-decoder")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (getattr(text_config, "alibi", False) or getattr(getattr(text_config, "attn_config", None), "alibi", False)
            or getattr(text_config, "model_type", None) in ("bloom", "mpt")):
        raise ValueError(f"tree_speculative does not support ALiBi attention ({name} is {type(model).__name__}): "
                         "its position bias is built from a 2D padding mask, which cannot express a token tree")
    if getattr(model, "_is_stateful", False):
        raise ValueError(f"tree_speculative needs attention with a key/value cache it can cut to the accepted path; "
                         f"{name} ({type(model).__name__}) keeps a recurrent state")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"tree_speculative needs a model whose forward takes position_ids; {name} "
                         f"({type(model).__name__}) does not")
    return _AttentionLayout(model, name)


class _Tree:
    """The draft tree of one row, grown level by level. Node 0 is the root (last committed token)."""

    def __init__(self, root_token):
        self.tokens = [root_token]
        self.parents = [-1]
        self.depths = [0]
        self.cum_logprob = [0.0]
        self.draft_slot = [None]  # draft-cache slot of nodes fed to the draft (expanded nodes)
        self.draft_row = {}  # node -> row of the draft distribution it was expanded with
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


def _ancestors(tree, node):
    path = []
    while node > 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def _prune(tree, max_nodes, whole_groups):
    """Keep at most ``max_nodes`` drafted nodes, best cumulative log-probability first.

    The kept set is closed under parents because a child never beats its parent (ties go to the
    shallower node). Returns (tokens, parents, old index of each kept node) in topological order,
    siblings in drafting order. ``whole_groups`` trees were already grown within budget.
    """
    drafted = list(range(1, len(tree)))
    if not whole_groups and len(drafted) > max_nodes:
        drafted.sort(key=lambda i: (-tree.cum_logprob[i], tree.depths[i], i))
        drafted = drafted[:max_nodes]
    kept = [0] + sorted(drafted, key=lambda i: (tree.depths[i], i))
    new_index = {old: new for new, old in enumerate(kept)}
    parents = [-1] + [new_index[tree.parents[old]] for old in kept[1:]]
    return [tree.tokens[i] for i in kept], parents, kept


def _processes_positions(logits_processor):
    """Whether some processor's output depends on the token ids (then each tree node needs its own
    path as input_ids); pure warpers (temperature, top-k/p, ...) only look at the scores."""
    from transformers import generation as hf_generation

    pure = tuple(getattr(hf_generation, name) for name in (
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
        "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper") if hasattr(hf_generation, name))
    return any(not isinstance(processor, pure) for processor in logits_processor)


def _apply_processors(logits_processor, logits, row_ids, trees_kept, depth_of):
    """Run the generate loop's logits processors on every tree node's logits, as plain decoding
    would have at that node: input_ids = the row's committed ids + the node's drafted path."""
    if len(logits_processor) == 0:
        return logits
    batch, nodes, vocab = logits.shape
    if not _processes_positions(logits_processor):
        ids = torch.stack(row_ids)[:, None, :].expand(batch, nodes, -1).reshape(batch * nodes, -1) \
            if len({len(r) for r in row_ids}) == 1 else None
        if ids is not None:
            return logits_processor(ids, logits.reshape(batch * nodes, vocab)).view(batch, nodes, vocab)
    processed = logits.clone()
    for b, (tokens, parents) in enumerate(trees_kept):
        by_depth = {}
        for node in range(len(tokens)):
            by_depth.setdefault(depth_of[b][node], []).append(node)
        for depth, members in by_depth.items():
            paths = []
            for node in members:
                path, cursor = [], node
                while cursor > 0:
                    path.append(tokens[cursor])
                    cursor = parents[cursor]
                paths.append(path[::-1])
            suffix = torch.tensor(paths, dtype=row_ids[b].dtype, device=logits.device).view(len(members), depth)
            ids = torch.cat([row_ids[b][None, :].expand(len(members), -1), suffix], dim=1)
            index = torch.tensor(members, device=logits.device)
            processed[b, index] = _as_row(logits_processor, b, len(members))(ids, logits[b, index])
    return processed


def _as_row(logits_processor, row, count):
    """The processors as they would act on batch row ``row`` of plain decoding, for a call with
    ``count`` nodes of that row. Two of transformers' processors keep per-row state: the repetition
    penalty's ``prompt_ignore_length`` (each prompt's padding, a ``[B]`` tensor since 5.2x) and the
    batch id that ``prefix_allowed_tokens_fn`` is called with."""
    from transformers import generation as hf_generation

    viewed = []
    for processor in logits_processor:
        ignored = getattr(processor, "prompt_ignore_length", None)
        if isinstance(processor, hf_generation.RepetitionPenaltyLogitsProcessor) and isinstance(ignored, torch.Tensor):
            processor = copy.copy(processor)
            processor.prompt_ignore_length = ignored[row].expand(count)
        elif isinstance(processor, hf_generation.PrefixConstrainedLogitsProcessor):
            allowed_tokens, processor = processor._prefix_allowed_tokens_fn, copy.copy(processor)
            processor._prefix_allowed_tokens_fn = lambda batch_id, ids: allowed_tokens(row, ids)
        viewed.append(processor)
    return type(logits_processor)(viewed)


def _draft_distribution(logits, target_vocab, temperature):
    """Draft log-probabilities over the target's vocabulary (a draft with a padded or smaller
    vocabulary proposes only ids both models have)."""
    vocab = logits.shape[-1]
    if vocab > target_vocab:
        logits = logits[..., :target_vocab]
    elif vocab < target_vocab:
        logits = torch.nn.functional.pad(logits, (0, target_vocab - vocab), value=-math.inf)
    return torch.log_softmax(logits / temperature, dim=-1)


def _propose(logprobs, top_k, multi_draft):
    """Children proposals for every row of one draft forward, as Python lists (one host sync per
    level, not one per node): the top-k tokens, or ``top_k`` i.i.d. samples in multi-draft mode,
    with their draft log-probabilities."""
    if multi_draft:
        tokens = torch.multinomial(logprobs.exp(), top_k, replacement=True)
    else:
        tokens = logprobs.topk(min(top_k, logprobs.shape[-1])).indices
    return tokens.tolist(), logprobs.gather(1, tokens).tolist()


def _grow(trees, draft, distributions, config, multi_draft, alpha, tree_start, root_positions, vocab, temperature):
    """Grow every row's tree level by level; one batched draft forward per level.

    Level d expands the fed nodes of depth d - 1 (their draft distributions are known): top-k
    children, or ``top_k`` i.i.d. samples in multi-draft mode. Then the ``top_k`` most probable new
    nodes are fed to the draft so the next level can expand them, unless the best of them is below
    the row's alpha (LLMCad's fallback) or can no longer make the final ``max_nodes`` cut. The
    feed's tokens and masks are built on the host and copied to the device once per level.
    """
    device = draft.valid.device
    batch = len(trees)
    proposals = [_propose(distributions[0], config.top_k, multi_draft)]
    for depth in range(1, config.max_depth + 1):
        for tree in trees:
            if not tree.growing:
                continue
            for node in [n for n in tree.nodes_at(depth - 1) if n in tree.draft_row]:
                if multi_draft and len(tree) - 1 + config.top_k > config.max_nodes:
                    tree.growing = False  # i.i.d. sibling groups are kept whole or not drafted
                    break
                level, row = tree.draft_row[node]
                tokens, logprobs = proposals[level]
                for token, logprob in zip(tokens[row], logprobs[row]):
                    if math.isfinite(logprob):
                        tree.add(token, node, logprob)
        if depth == config.max_depth:
            break
        feeds = []
        for b, tree in enumerate(trees):
            feed = []
            if tree.growing:
                frontier = sorted(tree.nodes_at(depth), key=lambda i: (-tree.cum_logprob[i], i))[:config.top_k]
                if frontier:
                    best = tree.cum_logprob[frontier[0]]
                    at_least_as_good = sum(1 for c in tree.cum_logprob[1:] if c >= best)
                    if math.exp(best) < alpha[b] or (not multi_draft and at_least_as_good >= config.max_nodes):
                        frontier = []
                tree.growing = bool(frontier)
                feed = frontier
            feeds.append(feed)
        width = max(len(f) for f in feeds)
        if width == 0:
            break
        tokens = torch.zeros(batch, width, dtype=torch.long)
        token_valid = torch.zeros(batch, width, dtype=torch.bool)
        past_allowed = torch.zeros(batch, width, draft.length, dtype=torch.bool)
        past_allowed[:, :, :tree_start] = True
        first_slot = draft.length
        for b, feed in enumerate(feeds):
            tree = trees[b]
            for j, node in enumerate(feed):
                tokens[b, j] = tree.tokens[node]
                token_valid[b, j] = True
                ancestors = [tree.draft_slot[a] for a in _ancestors(tree, node)[:-1]]
                past_allowed[b, j, ancestors] = True
                tree.draft_slot[node] = first_slot + j
                tree.draft_row[node] = (len(distributions), b * width + j)
        positions = (root_positions + depth)[:, None].expand(batch, width)
        eye = torch.eye(width, dtype=torch.bool, device=device)[None].expand(batch, -1, -1)
        logits = draft.forward(tokens.to(device), token_valid.to(device), positions.to(device), eye,
                               past_allowed.to(device))
        distributions.append(_draft_distribution(logits.reshape(batch * width, -1), vocab, temperature))
        proposals.append(_propose(distributions[-1], config.top_k, multi_draft))


def _draft_probs(kept, trees, distributions, vocab):
    """``[B, N, V]`` draft probabilities for SpecInfer verification: row n holds the distribution
    node n's children were drawn from (zeros for nodes without children), one gather per level."""
    device = distributions[0].device
    probs = torch.zeros(len(kept), max(len(k[0]) for k in kept), vocab, dtype=torch.float32, device=device)
    by_level = {}
    for b, (_, _, old) in enumerate(kept):
        for new, old_index in enumerate(old):
            if old_index in trees[b].draft_row:
                level, row = trees[b].draft_row[old_index]
                by_level.setdefault(level, ([], [], []))
                for target_list, value in zip(by_level[level], (b, new, row)):
                    target_list.append(value)
    for level, (rows_b, rows_n, source) in by_level.items():
        probs[torch.tensor(rows_b, device=device), torch.tensor(rows_n, device=device)] = \
            distributions[level][torch.tensor(source, device=device)].exp()
    return probs


def _target_forward(target, chain, tokens, token_valid, positions, tree_mask):
    """The target's forward over the tree, preceded by a causal chain of committed tokens not yet in
    its cache (the prompt, on the first step). Returns the tree nodes' logits."""
    if chain is None:
        return target.forward(tokens, token_valid, positions, tree_mask, last=tokens.shape[1])
    chain_tokens, chain_valid, chain_positions = chain
    batch, length = chain_tokens.shape
    nodes = tokens.shape[1]
    device = tokens.device
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))[None] & chain_valid[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=device)[None]
    top = torch.cat([causal | eye, torch.zeros(batch, length, nodes, dtype=torch.bool, device=device)], dim=2)
    bottom = torch.cat([chain_valid[:, None, :].expand(batch, nodes, length), tree_mask], dim=2)
    return target.forward(torch.cat([chain_tokens, tokens], 1), torch.cat([chain_valid, token_valid], 1),
                          torch.cat([chain_positions, positions], 1), torch.cat([top, bottom], 1), last=nodes)


def _emit(emitted, new_tokens, row_ids, stopping_criteria):
    """Append tokens one at a time, as plain decoding would, until a stopping criterion fires.
    ``row_ids`` already ends with all of ``new_tokens``. Returns whether the row is finished."""
    base = row_ids.shape[0] - len(new_tokens)
    for i, token in enumerate(new_tokens):
        emitted.append(token)
        if len(stopping_criteria) and bool(stopping_criteria(row_ids[None, :base + i + 1], None).any()):
            return True
    return False


def _branch_depth(parents, depths, node):
    """Depth of the deepest drafted node under ``node`` (itself included): how deep the branch the
    walk stopped in was drafted. Equal to ``depths[node]`` when the walk reached a leaf."""
    deepest = list(depths)
    for child in range(len(parents) - 1, 0, -1):  # children come after their parents
        deepest[parents[child]] = max(deepest[parents[child]], deepest[child])
    return deepest[node]


def _update_alpha(alpha, row, accepted, drafted_depth, config):
    """LLMCad's fallback threshold: halve it when the whole drafted branch was accepted, else set
    it to the fraction of the branch that was rejected."""
    if drafted_depth == 0:
        return
    if accepted >= drafted_depth:
        halved = alpha[row] / 2
        alpha[row] = halved if halved >= config.min_alpha else min(alpha[row], config.min_alpha)
    else:
        alpha[row] = 1.0 - accepted / drafted_depth


def _assemble(input_ids, emitted, pad_token):
    width = max(len(tokens) for tokens in emitted)
    if any(len(tokens) < width for tokens in emitted) and pad_token is None:
        raise ValueError("rows finished at different lengths and generation_config has no pad_token_id "
                         "(nor eos_token_id) to pad them with")
    fill = int(pad_token) if pad_token is not None else 0
    new = torch.full((input_ids.shape[0], width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, tokens in enumerate(emitted):
        new[b, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, new], dim=1)


def tree_speculative(model, input_ids, logits_processor, stopping_criteria, generation_config,
                     synced_gpus=False, streamer=None, draft_model=None, tree_config=None, token_streamer=None,
                     **model_kwargs):
    """Tree speculative decoding as a ``custom_generate`` callable for ``model.generate``.

    Greedy output is token-for-token what ``model.generate(do_sample=False)`` gives (up to float
    rounding of batched vs one-token forwards); sampled output has the target's distribution. The
    user's logits processors and stopping criteria apply at every emitted position, as in plain
    decoding. Sliding-window layers get their window in the tree mask. Beam search,
    encoder-decoder models, ALiBi (Bloom, MPT, Falcon with ``alibi=True``), chunked attention,
    recurrent models (Mamba & co.) and attention implementations that ignore a 4D mask (flash
    attention) are refused with a ValueError before any forward.

    Logits processors run on the target's logits of every tree node, drafted nodes that end up
    rejected included, with that node's path as ``input_ids`` and several nodes per call: they must
    be functions of ``(input_ids, scores)`` that keep no history (as most of transformers' are).

    Streaming: transformers does not hand ``streamer=`` to ``custom_generate`` callables (it only
    puts the prompt), so pass ``token_streamer=<a BaseStreamer>`` instead: it gets the prompt, then
    the accepted tokens after every verification, then ``end()``.

    Example::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import TreeConfig, bundled_model_path, tree_speculative
        >>> target = AutoModelForCausalLM.from_pretrained(bundled_model_path("target"))
        >>> draft = AutoModelForCausalLM.from_pretrained(bundled_model_path("draft"))
        >>> tok = AutoTokenizer.from_pretrained(bundled_model_path("target"))
        >>> inputs = tok(["12+34="], return_tensors="pt")
        >>> out = target.generate(**inputs, custom_generate=tree_speculative, draft_model=draft,
        ...                       tree_config=TreeConfig(max_depth=4, top_k=3), max_new_tokens=20,
        ...                       do_sample=False, return_dict_in_generate=True)
        >>> out.mean_accepted_length > 1
        True
    """
    config = TreeConfig() if tree_config is None else tree_config
    if not isinstance(config, TreeConfig):
        raise TypeError(f"tree_config must be a fusedecode.hf.TreeConfig, got {type(tree_config).__name__}")
    if draft_model is None:
        raise ValueError("tree_speculative needs draft_model=<a causal LM sharing the target's tokenizer>")
    if getattr(generation_config, "num_beams", 1) != 1:
        raise ValueError(f"tree_speculative does not do beam search (num_beams={generation_config.num_beams})")
    if synced_gpus:
        raise ValueError("tree_speculative does not support synced_gpus")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"tree_speculative does not return {flag.replace('output_', '')} "
                             f"({flag}=True); use fusedecode.hf.UncertaintyProcessor with plain generate")
    if token_streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError("token_streamer takes one sequence: use a batch of 1 with a streamer")
        streamer = token_streamer
        streamer.put(input_ids.cpu())
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("tree_speculative needs input_ids, not inputs_embeds")
    if any(isinstance(processor, UncertaintyProcessor) for processor in logits_processor):
        raise ValueError("UncertaintyProcessor records one entry per row and step, but under tree_speculative "
                         "processors also run on every drafted node; drop it from logits_processor "
                         "(fusedecode.verify_tree computes the same statistics for every node)")
    target_layout = _check_model(model, "the target model")
    draft_layout = _check_model(draft_model, "draft_model")
    if draft_model.device != input_ids.device:
        raise ValueError(f"draft_model is on {draft_model.device} but the inputs are on {input_ids.device}; "
                         "put both models on the same device")

    device = input_ids.device
    batch, prompt_length = input_ids.shape
    do_sample = bool(generation_config.do_sample)
    multi_draft = do_sample and config.sampling == "multi_draft"
    draft_temperature = float(generation_config.temperature or 1.0) if do_sample else 1.0
    attention_mask = model_kwargs.get("attention_mask")
    prompt_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(device=device, dtype=torch.bool))
    pad_token = generation_config.pad_token_id  # generate pads with the first EOS when there is none
    if pad_token is None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        pad_token = eos[0] if isinstance(eos, (list, tuple)) else int(eos)
    target = _SlotCache(model, batch, device, target_layout)
    draft = _SlotCache(draft_model, batch, device, draft_layout)
    target_vocab = None
    draft_input_vocab = draft_model.get_input_embeddings().weight.shape[0]

    num_real = prompt_valid.sum(1).tolist()  # real tokens committed per row (the root included)
    # The caches hold every committed token but the last (the next tree's root). The prompt is not
    # prefilled on its own: the first target forward scores it together with the first tree, and the
    # draft's first forward takes it as its pending chain, so no pass is spent on the prompt alone.
    target_chain = None
    if prompt_length > 1:
        chain_valid = prompt_valid[:, :-1]
        target_chain = (input_ids[:, :-1], chain_valid, (chain_valid.long().cumsum(1) - 1).clamp(min=0))

    row_ids = [input_ids[b] for b in range(batch)]  # what plain decoding's processors would see
    emitted = [[] for _ in range(batch)]  # tokens the caller gets, cut by the stopping criteria
    finished = [False] * batch
    pending = [input_ids[b][prompt_valid[b]].tolist() for b in range(batch)]  # committed, not yet fed to the draft
    alpha = [float(config.alpha)] * batch
    accepted_per_step, tokens_this_run, row_forwards = [], 0, 0

    while not all(finished):
        # 1. Feed the draft the committed tokens it has not seen; the last one is the tree's root.
        width = max(len(p) for p in pending)
        # Right-aligned, so that every row's root is the last column: only its logits are computed.
        tokens = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        token_valid = torch.zeros(batch, width, dtype=torch.bool)
        for b, chain in enumerate(pending):
            tokens[b, width - len(chain):] = torch.tensor(chain)
            positions[b, width - len(chain):] = torch.arange(num_real[b] - len(chain), num_real[b])
            token_valid[b, width - len(chain):] = True
        # Ids the draft's embedding lacks (a draft with a smaller padded vocabulary) reach it as id 0;
        # it never proposes them, and verification stays exact whatever the draft sees.
        tokens = torch.where(tokens < draft_input_vocab, tokens, torch.zeros_like(tokens))
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        new_mask = (causal[None] & token_valid[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        root_logits = draft.forward(tokens.to(device), token_valid.to(device), positions.to(device),
                                    new_mask.to(device), last=1)[:, -1]
        tree_start = draft.length

        if target_vocab is None:
            target_vocab = model.get_output_embeddings().weight.shape[0]
        trees = [_Tree(pending[b][-1]) for b in range(batch)]
        distributions = [_draft_distribution(root_logits, target_vocab, draft_temperature)]
        for b, tree in enumerate(trees):
            tree.draft_row[0] = (0, b)
        root_positions = torch.tensor(num_real) - 1
        _grow(trees, draft, distributions, config, multi_draft, alpha, tree_start, root_positions, target_vocab,
              draft_temperature)

        # 2. One target forward over every row's pruned tree.
        kept = [_prune(tree, config.max_nodes, multi_draft) for tree in trees]
        nodes = max(len(k[0]) for k in kept)
        draft_tokens = torch.full((batch, nodes), -1, dtype=torch.long)
        parents = torch.zeros(batch, nodes, dtype=torch.long)
        depth_of = []
        for b, (tree_tokens, tree_parents, old) in enumerate(kept):
            draft_tokens[b, :len(tree_tokens)] = torch.tensor(tree_tokens)
            parents[b, :len(tree_parents)] = torch.tensor(tree_parents)
            depth_of.append([trees[b].depths[i] for i in old])
        parents[:, 0] = -1
        node_valid = draft_tokens >= 0
        node_valid[:, 0] = True
        positions = tree_position_ids(parents, root_positions)  # padding nodes get a harmless depth 1
        draft_tokens, parents = draft_tokens.to(device), parents.to(device)
        logits = _target_forward(target, target_chain, draft_tokens.clamp(min=0), node_valid.to(device),
                                 positions.to(device), tree_attention_mask(parents))
        target_start = target.length - nodes
        target_chain = None
        row_forwards += sum(not f for f in finished)

        # 3. Verify: the usual processors at every node, then one fused walk.
        scores = _apply_processors(logits_processor, logits, row_ids, [(k[0], k[1]) for k in kept], depth_of)
        draft_probs = _draft_probs(kept, trees, distributions, scores.shape[-1]) if multi_draft else None
        result = verify_tree(scores, draft_tokens, parents, temperature=1.0 if do_sample else 0.0,
                             draft_probs=draft_probs)
        walk = torch.cat([result.num_accepted[:, None], result.accepted_nodes, result.output_tokens], 1).tolist()
        depth_plus_one = result.accepted_nodes.shape[1]

        # 4. Commit, emit what the stopping criteria allow, and keep only the accepted path cached.
        step_accepted = []
        target_keep = torch.zeros(batch, target.length, dtype=torch.bool)
        target_keep[:, :target_start] = True
        draft_keep = torch.zeros(batch, draft.length, dtype=torch.bool)
        draft_keep[:, :tree_start] = True
        for b in range(batch):
            count = walk[b][0]
            path = walk[b][1:2 + count]
            new_tokens = walk[b][1 + depth_plus_one:2 + depth_plus_one + count]
            target_keep[b, [target_start + node for node in path]] = True
            fed = [kept[b][2][node] for node in path[1:]]
            fed_slots = [trees[b].draft_slot[old] for old in fed]
            fed_count = next((i for i, slot in enumerate(fed_slots) if slot is None), len(fed_slots))
            draft_keep[b, fed_slots[:fed_count]] = True
            pending[b] = new_tokens[fed_count:]
            row_ids[b] = torch.cat([row_ids[b], torch.tensor(new_tokens, dtype=row_ids[b].dtype, device=device)])
            num_real[b] += len(new_tokens)
            step_accepted.append(-1 if finished[b] else count)
            if not finished[b]:
                before = len(emitted[b])
                finished[b] = _emit(emitted[b], new_tokens, row_ids[b], stopping_criteria)
                tokens_this_run += len(emitted[b]) - before
                if streamer is not None and b == 0:
                    streamer.put(torch.tensor(emitted[b][before:], dtype=torch.long))
            if config.adaptive:
                _update_alpha(alpha, b, count, _branch_depth(kept[b][1], depth_of[b], path[-1]), config)
        accepted_per_step.append(step_accepted)
        target.keep(target_keep.to(device))
        draft.keep(draft_keep.to(device))

    if streamer is not None:
        streamer.end()
    sequences = _assemble(input_ids, emitted, pad_token)
    if not generation_config.return_dict_in_generate:
        return sequences
    output_class = _output_class()
    return output_class(sequences=sequences,
                        num_accepted=torch.tensor(accepted_per_step, dtype=torch.long),
                        mean_accepted_length=tokens_this_run / max(row_forwards, 1))
