"""When to act during decoding: SRGen's entropy rule over tokens and a threshold on a step measure.
Framework-free (torch only), shared by SRGen's correction (``fusedecode.hf.srgen``), the reflection
insertion (``fusedecode.reflection``) and the engine integrations.

- ``SRGenTrigger``: the settings of SRGen's rule (Mu et al. 2025, the authors' code:
  SRGen/tnot_decorator.py, ``apply_entropy_control``). Per trace, each tested token's entropy is
  compared with a threshold from the trace's earlier tested entropies, and only then recorded:
  ``warmup_threshold`` while fewer than ``window`` are recorded, then
  ``max(mean + k * max(std, min_std), min_threshold)`` over the last ``window`` (float32 mean and
  unbiased std). The token fires the rule when its entropy is above the threshold (NaN never fires).
  Which tokens are tested is the caller's: SRGen skips the first generated token, the reflection
  insertion also its inserted tokens.
- ``EntropyWindow``, ``new_entropy_window``, ``srgen_thresholds``, ``record_entropies``: the rule as
  pure functions over each row's last ``window`` tested entropies, on the device.
- ``StepTrigger``: a threshold on a measure (``fusedecode.steps``) of one recorded field over a
  step, tested when the step ends at a delimiter.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._validation import check_float, check_int
from .ops.logit_stats import float_outputs
from .steps import DEFAULT_TAIL, MEASURES

__all__ = ["SRGenTrigger", "EntropyWindow", "new_entropy_window", "srgen_thresholds", "record_entropies",
           "StepTrigger", "STEP_FIELDS"]

# The per-token fields a step trigger may measure: every float output of logit_stats.
STEP_FIELDS = float_outputs("token_ids", "topk")


@dataclass(frozen=True)
class SRGenTrigger:
    r"""SRGen's entropy rule (see the module docstring), with the defaults of ``SRGenConfig``.

    Args:
        window: number of recent tested entropies the threshold is computed from (>= 2).
        k: how many standard deviations above the mean an entropy must be to fire.
        min_std: floor of the standard deviation (>= 0), so that a flat history does not fire on noise.
        min_threshold: floor of the threshold (nats); ``float("inf")`` disables the rule.
        warmup_threshold: threshold (nats) while fewer than ``window`` entropies are recorded;
            ``float("inf")``: never fires during the warm-up.

    Example::

        >>> SRGenTrigger(window=10, k=2.0).min_std
        0.5
        >>> SRGenTrigger(min_std=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: min_std must be in [0.0, inf], got -1.0
    """

    window: int = 25
    k: float = 4.0
    min_std: float = 0.5
    min_threshold: float = 1.8
    warmup_threshold: float = 3.0

    def __post_init__(self):
        check_int("window", self.window, 2)  # an unbiased std needs two entries
        check_float("k", self.k)
        check_float("min_std", self.min_std, low=0.0)
        check_float("min_threshold", self.min_threshold, allow_infinite=True)
        check_float("warmup_threshold", self.warmup_threshold, allow_infinite=True)


class EntropyWindow(NamedTuple):
    """Per row: ``history`` ``[B, window]`` float32, a ring of the last tested entropies, and
    ``count`` ``[B]`` int64, how many were recorded. Mean and std are taken only once the ring is
    full, so its order never matters."""

    history: torch.Tensor
    count: torch.Tensor


def new_entropy_window(batch, window, device):
    return EntropyWindow(torch.zeros(batch, window, dtype=torch.float32, device=device),
                         torch.zeros(batch, dtype=torch.int64, device=device))


def srgen_thresholds(state, rule):
    """``[B]`` float32: each row's threshold for its next tested entropy (``rule``: an
    ``SRGenTrigger``)."""
    spread = state.history.std(dim=1).clamp(min=rule.min_std)
    threshold = (state.history.mean(dim=1) + rule.k * spread).clamp(min=rule.min_threshold)
    warmup = torch.full_like(threshold, rule.warmup_threshold)
    return torch.where(state.count >= rule.window, threshold, warmup)


def record_entropies(state, entropy, rows):
    """Adds ``entropy`` ``[B]`` to the windows of ``rows`` ``[B]`` bool (the others are unchanged)."""
    window = state.history.shape[1]
    slot = (state.count % window).unsqueeze(1)
    written = state.history.scatter(1, slot, entropy.float().unsqueeze(1))
    return EntropyWindow(torch.where(rows.unsqueeze(1), written, state.history), state.count + rows.long())


@dataclass(frozen=True)
class StepTrigger:
    r"""Fires at the end of a step (a delimiter, ``fusedecode.steps``) whose ``measure`` of ``field``
    is above (``fires_when="above"``) or below (``"below"``) ``threshold``; NaN never fires.

    Args:
        threshold: a finite float.
        field: the per-token statistic measured (a float output of ``fusedecode.logit_stats``:
            ``"entropy"``, ``"self_certainty"``, ``"topk_confidence"``, ...).
        measure: ``"mean"``, ``"min"``, ``"tail"`` (mean of the step's last ``tail`` tokens) or
            ``"count"`` (the step's tokens).
        fires_when: ``"above"`` (e.g. a high mean entropy) or ``"below"`` (e.g. a low confidence).
        tail: tokens of the ``tail`` measure (>= 1).

    Example::

        >>> StepTrigger(threshold=0.5, measure="tail", tail=4).field
        'entropy'
        >>> StepTrigger(threshold=0.5, measure="max")
        Traceback (most recent call last):
        ...
        ValueError: measure must be one of ('count', 'mean', 'min', 'tail'), got 'max'
    """

    threshold: float
    field: str = "entropy"
    measure: str = "mean"
    fires_when: str = "above"
    tail: int = DEFAULT_TAIL

    def __post_init__(self):
        check_float("threshold", self.threshold)
        if self.field not in STEP_FIELDS:
            raise ValueError(f"field must be one of {STEP_FIELDS}, got {self.field!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")
        if self.fires_when not in ("above", "below"):
            raise ValueError(f"fires_when must be 'above' or 'below', got {self.fires_when!r}")
        check_int("tail", self.tail, 1)

    def fires(self, value):
        """``[B]`` bool: where ``value`` ``[B]`` (the measure at a step's end) fires the trigger."""
        return value > self.threshold if self.fires_when == "above" else value < self.threshold
