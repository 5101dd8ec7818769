"""``EntropyTrigger``: which rows SRGen corrects at each step, by the rule of the authors' code (the
rule itself is in ``fusedecode.triggers``, shared with the reflection insertion)."""

import torch

from ...triggers import new_entropy_window, record_entropies, srgen_thresholds


class EntropyTrigger:
    """SRGen's trigger rule (see ``SRGenConfig``) for every row of a batch, kept on the device.

    ``update`` is called once per generated step, the first call being the step of the prompt's
    forward pass (never tested nor recorded). The last ``window`` entropies of each row live in a ring
    buffer (``fusedecode.triggers.EntropyWindow``). ``threshold`` holds each row's threshold at the
    last ``update`` and ``corrections`` how many triggers each row has been granted.

    Example::

        >>> import torch
        >>> from fusedecode.hf import SRGenConfig
        >>> trigger = EntropyTrigger(SRGenConfig(window=4, k=1.0, min_std=0.0, min_threshold=0.0,
        ...                                      warmup_threshold=9.0), batch_size=1, device="cpu")
        >>> active = torch.tensor([True])
        >>> [bool(trigger.update(torch.tensor([e]), active)) for e in (9.5, 1.0, 1.0, 1.0, 3.0, 5.0)]
        [False, False, False, False, False, True]
        >>> trigger.threshold  # mean 1.5 + 1 * std 1 of the window [1, 1, 1, 3] before the step
        tensor([2.5000])
    """

    def __init__(self, config, batch_size, device):
        self.config, self.rule = config, config.trigger
        self.window = new_entropy_window(batch_size, config.window, device)
        self.corrections = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.threshold = torch.full((batch_size,), config.warmup_threshold, device=device)
        self.seen_prompt_step = False

    def update(self, entropy, active):
        """Tests ``entropy`` ``[B]`` of the ``active`` rows against their thresholds, then adds it to
        their histories; returns ``[B]`` bool: the rows to correct at this step (above the threshold,
        corrections left). Finished rows keep their history unchanged."""
        config = self.config
        if not self.seen_prompt_step:
            self.seen_prompt_step = True
            return torch.zeros_like(active)
        entropy = entropy.float()
        self.threshold = srgen_thresholds(self.window, self.rule)
        self.window = record_entropies(self.window, entropy, active)
        correct = active & (entropy > self.threshold) & (self.corrections < config.max_corrections)
        self.corrections = self.corrections + correct.long()
        return correct
