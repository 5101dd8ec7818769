"""Per-token uncertainty in ``generate``: a drop-in logits processor, DeepConf stopping, Best-of-N.

Instead of ``output_scores=True`` (a ``[B, V]`` float tensor kept per step: ~19 GB for one sequence
of 32k steps at V = 152k), ``UncertaintyProcessor`` keeps one fused ``logit_stats`` call per step and
a few floats per row and step, on the scores' device, without synchronising with the host.
"""

import math
from collections import defaultdict

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .. import logit_stats

FIELDS = ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob")


class UncertaintyProcessor(LogitsProcessor):
    r"""Records ``fusedecode.logit_stats`` of every row at every generation step; returns ``scores``
    unchanged (the same tensor), so generation is identical with and without it.

    It measures the scores as the processors before it left them. Passed to ``generate`` through
    ``logits_processor=[...]`` it runs after transformers' own processors (repetition penalty, ...)
    and before the sampling warpers (temperature, top-k, top-p, which transformers always applies
    last): it records the model's distribution, scaled by its own ``temperature``. With greedy
    decoding, or sampling with temperature alone and the same ``temperature`` here, that is exactly
    the distribution ``output_scores=True`` returns. Under beam search the rows are the
    ``batch * num_beams`` beam slots of each step (beams are reordered between steps, so a row of
    the history is not one final hypothesis).

    Args:
        temperature: divides the scores before the statistics (use the sampling temperature to
            measure the distribution tokens are drawn from, as SRGen does).
        topk: if > 0, also record DeepConf's ``topk_confidence`` over the k most likely tokens.

    Attributes (``[B, steps]`` float32 tensors on the scores' device): ``entropy``, ``varentropy``,
    ``self_certainty``, ``logsumexp``, ``max_logprob``, and ``topk_confidence`` when ``topk > 0``.

    A new ``generate`` call or ``reset()`` starts a fresh history. (A call is recognised as new when
    its prompt is not exactly one token longer than the last step seen, or the batch size differs;
    call ``reset()`` before feeding an output plus exactly one token back in.)

    Example::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import UncertaintyProcessor, bundled_model_path
        >>> path = bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> processor = UncertaintyProcessor()
        >>> inputs = tokenizer(["12+34="], return_tensors="pt")
        >>> out = model.generate(**inputs, max_new_tokens=20, do_sample=False, logits_processor=[processor])
        >>> processor.entropy.shape[1] == out.shape[1] - inputs["input_ids"].shape[1]
        True
    """

    def __init__(self, temperature=1.0, topk=0):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= 64:
            raise ValueError(f"topk must be an int in [0, 64], got {topk!r}")
        self.temperature = float(temperature)
        self.topk = topk
        self.reset()

    def reset(self):
        """Forget the recorded history."""
        self._steps = defaultdict(list)
        self._stacked = {}
        self._next_length = None
        self._batch = None
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        length, batch = input_ids.shape[-1], input_ids.shape[0]
        if self._next_length is None or length != self._next_length or batch != self._batch:
            self.reset()
            self.prompt_length = length
        self._next_length, self._batch = length + 1, batch
        stats = logit_stats(scores, temperature=self.temperature, topk=self.topk)
        for field in FIELDS:
            self._steps[field].append(getattr(stats, field))
        if self.topk:
            self._steps["topk_confidence"].append(stats.topk_confidence)
        self._stacked = {}
        return scores

    @property
    def num_steps(self):
        return len(self._steps["entropy"])

    def history(self, field):
        """``[B, steps]`` tensor of one recorded field (stacked once, then cached)."""
        if field == "topk_confidence" and not self.topk:
            raise AttributeError("topk_confidence is recorded only with topk > 0")
        if field not in FIELDS and field != "topk_confidence":
            raise AttributeError(field)
        if field not in self._stacked:
            steps = self._steps.get(field)
            if not steps:
                return torch.empty((self._batch or 0, 0))
            self._stacked[field] = torch.stack(steps, dim=1)
        return self._stacked[field]

    def __getattr__(self, name):
        if name in FIELDS or name == "topk_confidence":
            return self.history(name)
        raise AttributeError(name)

    def token_mask(self, sequences, eos_token_id=None):
        """``[B, steps]`` bool: which recorded steps produced a real token of ``sequences`` (the output
        of generate). Steps after the first EOS (which is counted) and padding are excluded."""
        steps = self.num_steps
        generated = sequences[:, self.prompt_length:self.prompt_length + steps]
        mask = torch.ones_like(generated, dtype=torch.bool)
        if eos_token_id is not None:
            eos = torch.as_tensor(eos_token_id, device=generated.device).reshape(-1)
            is_eos = torch.isin(generated, eos)
            # Real tokens: up to and including the first EOS.
            after_eos = torch.cumsum(is_eos.int(), dim=1) - is_eos.int() > 0
            mask = ~after_eos
        return mask

    def sequence_self_certainty(self, sequences, eos_token_id=None):
        """Mean self-certainty of each sequence over its real generated tokens: ``[B]``.

        ``sequences`` is what ``generate`` returned (prompt included); tokens after the first EOS do
        not count. Rows with no real token give NaN.
        """
        mask = self.token_mask(sequences, eos_token_id).to(self.self_certainty.device)
        values = torch.where(mask, self.self_certainty[:, :mask.shape[1]], torch.zeros(()))
        return values.sum(1) / mask.sum(1)


class ConfidenceStopping(StoppingCriteria):
    r"""DeepConf's online early stop: a row stops once the mean ``topk_confidence`` of its last
    ``window`` tokens falls below ``threshold`` (low confidence: the trace is likely wrong).

    It reads the history of an ``UncertaintyProcessor`` (no second pass over the logits), which must
    also be given to ``generate``; ``stopper.processor`` is created with ``topk`` when none is passed.

    Example::

        >>> stopper = ConfidenceStopping(window=16, threshold=1.5)
        >>> out = model.generate(**inputs, logits_processor=[stopper.processor],
        ...                      stopping_criteria=[stopper])  # doctest: +SKIP
    """

    def __init__(self, window, threshold, topk=20, processor=None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float, got {threshold!r}")
        if processor is None:
            processor = UncertaintyProcessor(topk=topk)
        elif not isinstance(processor, UncertaintyProcessor) or processor.topk == 0:
            raise ValueError("processor must be an UncertaintyProcessor with topk > 0")
        self.window, self.threshold, self.processor = window, float(threshold), processor

    def sliding_confidence(self):
        """``[B]`` mean topk_confidence of the last ``window`` steps (NaN before the window fills)."""
        steps = self.processor._steps["topk_confidence"]
        if len(steps) < self.window:
            return None
        recent = torch.stack(steps[-self.window:], dim=1)
        return recent.mean(dim=1)

    def __call__(self, input_ids, scores, **kwargs):
        mean = self.sliding_confidence()
        if mean is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return (mean < self.threshold).to(input_ids.device)


def best_of_n(self_certainties, answers, power=0.5):
    r"""Borda voting with self-certainty (Kang et al., 2025).

    The N candidates are ranked by self-certainty (rank 1 = most certain); each votes for its answer
    with weight ``(N - r + 1) ** power`` (``power=0``: majority vote). The answer with the largest
    total wins; ties go to the answer holding the single highest self-certainty. Candidates whose
    answer is None (none could be extracted) are ignored.

    Returns ``(answer, totals)`` with ``totals`` the vote of every answer.

    Example::

        >>> best_of_n([2.0, 1.0, 0.5], ["12", "13", "13"])[0]
        '13'
        >>> best_of_n([2.0, 1.0, 0.5], ["12", "13", "13"], power=2.0)[0]
        '12'
    """
    values = [float(v) for v in (self_certainties.tolist() if isinstance(self_certainties, torch.Tensor)
                                 else self_certainties)]
    answers = list(answers)
    if len(values) != len(answers):
        raise ValueError(f"self_certainties ({len(values)}) and answers ({len(answers)}) differ in length")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or power < 0:
        raise ValueError(f"power must be a float >= 0, got {power!r}")
    ranked = sorted(((v if not math.isnan(v) else -math.inf, i) for i, v in enumerate(values)), reverse=True)
    n = len(values)
    totals, best_single = {}, {}
    for rank, (value, index) in enumerate(ranked, start=1):
        answer = answers[index]
        if answer is None:
            continue
        totals[answer] = totals.get(answer, 0.0) + (n - rank + 1) ** power
        best_single[answer] = max(best_single.get(answer, -math.inf), value)
    if not totals:
        return None, totals
    winner = max(totals, key=lambda a: (totals[a], best_single[a]))
    return winner, totals
