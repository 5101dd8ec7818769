"""SRGen's correction: the context's final hidden states, the optimisation of the corrective vector
``delta`` and the corrected logits of the rows the trigger picks."""

import torch

from ... import linear_cross_entropy_entropy, logit_stats
from ..models.head import check_head, corrected_logits
from .trigger import EntropyTrigger

IGNORE_INDEX = -100
ADAMW_WEIGHT_DECAY = 1e-8
ADAMW_EPS = 1e-5


class HiddenBuffer:
    """The final hidden states of every position of the sequences, ``[B, length, H]``, grown by one
    position per step with amortised doubling (no re-copy of the whole context each step)."""

    def __init__(self, prompt_hidden):
        self.storage = prompt_hidden.contiguous()
        self.length = prompt_hidden.shape[1]

    def append(self, step_hidden):
        """Adds ``[B, H]`` as the next position."""
        if self.length == self.storage.shape[1]:
            grown = self.storage.new_zeros(self.storage.shape[0], max(2 * self.length, 16), self.storage.shape[2])
            grown[:, :self.length] = self.storage[:, :self.length]
            self.storage = grown
        self.storage[:, self.length] = step_hidden
        self.length += 1

    def view(self, rows, start):
        """``[len(rows), length - start, H]``: positions ``start..length-1`` of ``rows``."""
        return self.storage[rows, start:self.length]


def context_targets(input_ids, attention_mask, rows, start):
    """Targets of positions ``start..L-1`` of ``rows`` (``L = input_ids.shape[1]``): position ``t``
    predicts token ``t + 1``; padding and the last position (the current step, whose token is not
    known yet) get ``IGNORE_INDEX``.

    Example::

        >>> ids, mask = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])
        >>> context_targets(ids, mask, torch.tensor([0]), 0)
        tensor([[-100,    6,    7, -100]])
    """
    ids, mask = input_ids[rows], attention_mask[rows].bool()
    valid = mask[:, :-1] & mask[:, 1:]
    targets = torch.where(valid, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    targets = torch.cat([targets, torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    return targets[:, start:]


def optimise_delta(context_hidden, targets, head, config, temperature):
    """SRGen's corrective vector for each row of ``context_hidden`` ``[n, T, H]``, whose last position
    is the current step: ``steps`` AdamW steps from zero on
    ``(1 - entropy_weight) * CE(context) + entropy_weight * entropy(current step at temperature)``,
    the logits being the model's own (``head``: an ``OutputHead``, transform included).
    Returns ``[n, H]`` float32. Adam is elementwise and the loss a sum over rows, so rows stay
    independent."""
    # Generation may run under inference_mode, whose tensors cannot be saved for backward.
    with torch.inference_mode(False), torch.enable_grad():
        if context_hidden.is_inference():
            context_hidden, targets = context_hidden.clone(), targets.clone()
        weight, bias = head.detached()
        delta = torch.zeros(context_hidden.shape[0], context_hidden.shape[2], dtype=torch.float32,
                            device=context_hidden.device, requires_grad=True)
        optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS)
        for _ in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            cross_entropy, entropy = linear_cross_entropy_entropy(
                context_hidden, weight, targets, delta=delta, bias=bias, logit_scale=head.transform.logit_scale,
                softcap=head.transform.softcap, temperature=temperature, ignore_index=IGNORE_INDEX)
            loss = ((1 - config.entropy_weight) * cross_entropy + config.entropy_weight * entropy).sum()
            loss.backward()
            optimizer.step()
    return delta.detach()


class Corrector:
    """SRGen's state across the steps of one ``generate`` call: the context's final hidden states
    (read through ``capture``, a ``FinalHiddenCapture``), the entropy trigger, and the corrections
    made so far (``corrections``, one list per row)."""

    def __init__(self, config, head, temperature, input_ids, capture):
        batch_size = input_ids.shape[0]
        self.config, self.head, self.temperature, self.capture = config, head, temperature, capture
        self.prompt_length = input_ids.shape[1]
        self.trigger = EntropyTrigger(config, batch_size, input_ids.device)
        self.corrections = [[] for _ in range(batch_size)]
        self.buffer = None  # the context's final hidden states, from the prefill on

    def step(self, input_ids, attention_mask, logits, active):
        """After each forward pass: keeps its final hidden states, then corrects, in place, the
        float32 ``logits`` ``[B, V]`` of the ``active`` rows the trigger picks."""
        self.observe(self.capture.take(), attention_mask, logits)
        self.correct(input_ids, attention_mask, logits, active)

    def observe(self, final_hidden, attention_mask, logits):
        """Keeps the final hidden states of the positions the forward pass just ran (the whole
        prompt on the prefill, one position after it)."""
        if self.buffer is None:
            check_head(logits, final_hidden[:, -1], self.head, user="srgen")
            # Padding positions may hold anything (even NaN); their targets are ignored anyway.
            self.buffer = HiddenBuffer(final_hidden.masked_fill(~attention_mask.bool().unsqueeze(-1), 0))
        else:
            self.buffer.append(final_hidden[:, -1])

    def correct(self, input_ids, attention_mask, logits, active):
        """Replaces, in place, the float32 ``logits`` ``[B, V]`` of the ``active`` rows the trigger
        picks by their corrected logits, and records the corrections."""
        config = self.config
        entropy = logit_stats(logits, temperature=self.temperature).entropy
        rows = self.trigger.update(entropy, active).nonzero().flatten()
        if not rows.numel():
            return
        length = input_ids.shape[1]
        start = max(0, length - 1 - config.context_window) if config.context_window else 0
        targets = context_targets(input_ids, attention_mask[:, :length], rows, start)
        context = self.buffer.view(rows, start)
        delta = optimise_delta(context, targets, self.head, config, self.temperature)
        logits[rows] = corrected_logits(context[:, -1], delta, self.head)
        entropy_after = logit_stats(logits[rows], temperature=self.temperature).entropy
        for row, before, after in zip(rows.tolist(), entropy[rows].tolist(), entropy_after.tolist()):
            self.corrections[row].append((length - self.prompt_length, before, after))
