"""``TreeConfig``: how the draft grows its token tree in ``tree_speculative``, and LLMCad's
adaptive fallback threshold."""

from dataclasses import dataclass

from ..._validation import ArgumentTypeError, check_float, check_int

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
        min_prob: drafted nodes whose cumulative draft probability is below this are not sent to the
            target (top-k trees; multi-draft sibling groups are kept whole). Every node costs target
            compute, which on a CPU grows with the node count; a node the draft itself gives a few
            percent is rarely accepted. 0 keeps every node up to ``max_nodes``. Any tree is lossless.
    """

    max_depth: int = 6
    top_k: int = 4
    max_nodes: int = 32
    alpha: float = 0.02
    adaptive: bool = True
    min_alpha: float = 1e-4
    sampling: str = "target_only"
    min_prob: float = 0.0

    def __post_init__(self):
        for name in ("max_depth", "top_k", "max_nodes"):
            check_int(f"TreeConfig.{name}", getattr(self, name), 1)
        for name in ("alpha", "min_alpha", "min_prob"):
            check_float(f"TreeConfig.{name}", getattr(self, name), 0.0, 1.0)
        if not isinstance(self.adaptive, bool):
            raise ArgumentTypeError(f"TreeConfig.adaptive must be a bool, got {self.adaptive!r}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"TreeConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")


def next_alpha(alpha, accepted, drafted_depth, config):
    """A row's fallback threshold after a verification that accepted ``accepted`` drafted tokens of
    a branch drafted ``drafted_depth`` deep (LLMCad, see ``TreeConfig.adaptive``): halved when the
    whole branch was accepted, else the fraction of the branch that was rejected."""
    if not config.adaptive or drafted_depth == 0:
        return alpha
    if accepted >= drafted_depth:
        halved = alpha / 2
        return halved if halved >= config.min_alpha else min(alpha, config.min_alpha)
    return 1.0 - accepted / drafted_depth
