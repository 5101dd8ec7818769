"""``SRGenConfig``: SRGen's entropy trigger and corrective optimisation settings."""

from dataclasses import dataclass
from typing import Optional

from ..._validation import check_float, check_int
from ...triggers import SRGenTrigger


@dataclass
class SRGenConfig:
    r"""Settings of SRGen's entropy trigger and of its corrective optimisation.

    Per row, each generated step's entropy (at the sampling temperature, on the model's logits) is
    compared with a threshold computed from the row's history of earlier step entropies, and only then
    appended to that history:

    - while the history holds fewer than ``window`` entropies: ``warmup_threshold``;
    - then ``max(mean + k * max(std, min_std), min_threshold)``, mean and unbiased std of the last
      ``window`` entropies before the current step.

    The step whose entropy is above its threshold is corrected (at most ``max_corrections`` times per
    row; later triggers are not acted on). The first generated token, the one the prompt's forward pass
    produces, is neither tested nor recorded: the history starts with the second. This is the rule of
    the authors' code (SRGen/tnot_decorator.py, ``apply_entropy_control``: threshold from
    ``entropy_history[-N:]`` once ``len(entropy_history) >= N``, then append; the prompt stage is never
    tested). There a detection ends the generate call and the next call's prompt stage makes the
    correction, and ``max_retries`` counts detections, the last of which is not corrected:
    ``max_retries=R`` is ``max_corrections=R - 1`` (their ``max_retries=20``: 19 corrections).

    Args:
        window: number of recent step entropies the threshold is computed from (>= 2).
        k: how many standard deviations above the mean an entropy must be to trigger.
        min_std: floor of the standard deviation, so that a flat history does not trigger on noise.
        min_threshold: floor of the threshold (nats).
        warmup_threshold: threshold (nats) while the history is shorter than ``window``.
            ``float("inf")`` in both thresholds disables triggering.
        steps: AdamW steps per correction (>= 1).
        lr: AdamW learning rate (weight decay 1e-8, eps 1e-5).
        entropy_weight: weight ``w`` of the loss ``(1 - w) * CE(context) + w * entropy(current step)``.
        max_corrections: most corrections per row (0 disables SRGen); the authors' ``max_retries``
            minus one.
        context_window: if set, the cross-entropy covers only the last ``context_window`` context
            tokens (the most recent ones), bounding the cost of a correction on long contexts.

    Example::

        >>> from fusedecode.hf import SRGenConfig
        >>> SRGenConfig(k=3.0, max_corrections=5).window
        25
        >>> SRGenConfig(window=1)
        Traceback (most recent call last):
        ...
        ValueError: window must be >= 2, got 1
    """

    window: int = 25
    k: float = 4.0
    min_std: float = 0.5
    min_threshold: float = 1.8
    warmup_threshold: float = 3.0
    steps: int = 3
    lr: float = 0.01
    entropy_weight: float = 0.05
    max_corrections: int = 20
    context_window: Optional[int] = None

    def __post_init__(self):
        self.trigger  # validates the trigger's settings
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, low=0.0)
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        check_float("entropy_weight", self.entropy_weight, low=0.0, high=1.0)
        check_int("max_corrections", self.max_corrections, 0)
        if self.context_window is not None:
            check_int("context_window", self.context_window, 1)

    @property
    def trigger(self):
        """The trigger's settings, an ``SRGenTrigger`` (the rule shared with the reflection insertion)."""
        return SRGenTrigger(self.window, self.k, self.min_std, self.min_threshold, self.warmup_threshold)
