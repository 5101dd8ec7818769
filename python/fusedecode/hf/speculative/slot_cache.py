"""``SlotCache``: a model's KV cache in which each batch row keeps its own set of valid slots; and
``check_model``: which models tree speculation can run with it exactly.

Each row of the batch keeps its own tree and accepts its own number of tokens (ragged acceptance), so
the cache holds per-row validity masks: slots of rejected nodes are compacted away after each
verification, and every forward gets the 4D mask of the row's valid slots.
"""

import torch

from .._custom_generate import refuse_encoder_decoder
from ..models.attention import masked_attention_layout
from ..models.forward import logits_to_keep_keyword


def check_model(model, name):
    """Refuse, before any forward, what tree_speculative cannot run exactly; returns the model's
    attention layout."""
    refuse_encoder_decoder("tree_speculative", model, name)
    return masked_attention_layout(model, name, "tree_speculative")


class SlotCache:
    """A DynamicCache whose slots may be invalid per row (padding, dummy queries, compacted holes).

    ``valid[b, s]`` says whether slot s of row b holds a real token's key/value, ``positions[b, s]``
    the position it was fed at. Every forward gets a 4D additive mask built from them (one per layer
    type, each with its sliding window), so the model never attends an invalid slot.
    """

    def __init__(self, model, batch, device, layout=None):
        from transformers import DynamicCache

        self.model = model
        self.layout = check_model(model, "the model") if layout is None else layout
        self.logits_to_keep = logits_to_keep_keyword(model)
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
        extra = {self.logits_to_keep: last} if last and self.logits_to_keep else {}
        outputs = self.model(input_ids=tokens, attention_mask=self.layout.masks(allowed, positions, key_positions),
                             position_ids=positions, use_cache=True, return_dict=True,
                             **{self.layout.cache_keyword: self.cache}, **extra)
        self.valid = torch.cat([self.valid, token_valid], dim=1)
        self.positions = key_positions
        logits = outputs.logits if not last or extra else outputs.logits[:, -last:]
        return logits.float()

    def keep(self, wanted):
        """Keep the slots where ``wanted [B, S]`` is True, compacted to the left in slot order."""
        keep = wanted & self.valid
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

    def keep_prefix_and(self, start, slots):
        """Keep every slot before ``start`` and, in each row b, the slots listed in ``slots[b]``."""
        wanted = torch.zeros(len(slots), self.length, dtype=torch.bool)
        wanted[:, :start] = True
        for row, row_slots in enumerate(slots):
            wanted[row, row_slots] = True
        self.keep(wanted.to(self.valid.device))
