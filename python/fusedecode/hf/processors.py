"""Per-token uncertainty in ``generate``: a drop-in logits processor and DeepConf's online stop.

Instead of ``output_scores=True`` (a ``[B, V]`` float tensor kept per step: ~19 GB for one sequence
of 32k steps at V = 152k), ``UncertaintyProcessor`` keeps one fused ``logit_stats`` call per step and
a few floats per row and step, on the scores' device, without synchronising with the host. The
trace-level measures and votes over these histories (DeepConf, self-certainty Best-of-N) live in the
transformers-free ``fusedecode.confidence``.
"""

import math
from collections import defaultdict

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .. import logit_stats
from ..confidence import window_mean, window_parts
from ..ops.logit_stats import MAX_TOPK, float_outputs
from ..steps import DEFAULT_TAIL, DelimiterTable, check_delimiters, cut_step, new_cutter, spans_from_step_indices, \
    statistics_of_spans
from .._validation import check_float, check_int, check_temperature, is_real_number

# The recorded histories: every float output of logit_stats that needs no argument, plus those that
# ``topk`` asks for (token_logprob needs the emitted token, unknown when the scores are seen).
FIELDS = float_outputs()
TOPK_FIELDS = tuple(name for name in float_outputs("topk") if name not in FIELDS)


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
        delimiters: if given, also cut each row into reasoning steps at these token sequences
            (``fusedecode.steps``: a list of token ids or token-id sequences; a delimiter's tokens end
            the step they complete) as the tokens arrive, on the device: ``step_index`` and
            ``steps(...)``.

    Attributes (``[B, steps]`` float32 tensors on the scores' device): ``entropy``, ``varentropy``,
    ``self_certainty``, ``logsumexp``, ``max_logprob``, and ``topk_confidence`` when ``topk > 0``;
    with ``delimiters``, ``step_index`` (``[B, steps]`` int64: the step each generated token
    belongs to, 0 for the first).

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

    def __init__(self, temperature=1.0, topk=0, delimiters=None):
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.topk = check_int("topk", topk, 0, MAX_TOPK)
        self.delimiters = None if delimiters is None else check_delimiters(delimiters)
        self._delimiter_table = None
        self.reset()

    def reset(self):
        """Forget the recorded history."""
        self._steps = defaultdict(list)
        self._stacked = {}
        self._next_length = None
        self._batch = None
        self._cutter = None
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        length, batch = input_ids.shape[-1], input_ids.shape[0]
        if self._next_length is None or length != self._next_length or batch != self._batch:
            self.reset()
            self.prompt_length = length
        self._next_length, self._batch = length + 1, batch
        stats = logit_stats(scores, temperature=self.temperature, topk=self.topk)
        for field in self._fields():
            self._steps[field].append(getattr(stats, field))
        if self.delimiters is not None:
            self._steps["step_index"].append(self._cut_steps(input_ids, scores.shape[-1]))
        self._stacked = {}
        return scores

    def _cut_steps(self, input_ids, vocab):
        """``[B]`` the step of the token about to be drawn: the token before it (none at the first
        step, the prompt's last) is added to the row's current step, which it may end."""
        if self._cutter is None:
            table = self._delimiter_table
            if table is None or table.tokens.device != input_ids.device:
                largest = max(max(d) for d in self.delimiters)
                if largest >= vocab:
                    raise ValueError(f"delimiters hold token {largest}, outside the vocabulary ({vocab} tokens)")
                table = self._delimiter_table = DelimiterTable.build(self.delimiters, input_ids.device)
            self._cutter = new_cutter(input_ids.shape[0], table, input_ids.device)
        else:
            self._cutter, _ = cut_step(self._delimiter_table, self._cutter, input_ids[:, -1])
        return self._cutter.index

    def _fields(self):
        return FIELDS + TOPK_FIELDS if self.topk else FIELDS

    @property
    def num_steps(self):
        return len(self._steps["entropy"])

    def history(self, field):
        """``[B, steps]`` tensor of one recorded field (stacked once, then cached)."""
        if field in TOPK_FIELDS and not self.topk:
            raise AttributeError(f"{field} is recorded only with topk > 0")
        if field == "step_index" and self.delimiters is None:
            raise AttributeError("step_index is recorded only with delimiters")
        if field not in FIELDS + TOPK_FIELDS + ("step_index",):
            raise AttributeError(field)
        if field not in self._stacked:
            steps = self._steps.get(field)
            if not steps:
                return torch.empty((self._batch or 0, 0))
            self._stacked[field] = torch.stack(steps, dim=1)
        return self._stacked[field]

    def __getattr__(self, name):
        if name in FIELDS + TOPK_FIELDS + ("step_index",):
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

    def traces(self, field, sequences, eos_token_id=None):
        """Each row's history of ``field`` over its real generated tokens (see ``token_mask``): a list
        of 1-D float32 CPU tensors, ready for ``fusedecode.confidence`` (e.g. DeepConf's
        ``lowest_group_confidence(traces("topk_confidence", out, eos)[i], window)``)."""
        mask = self.token_mask(sequences, eos_token_id).cpu()
        values = self.history(field)[:, :mask.shape[1]].float().cpu()
        return [values[row][mask[row]] for row in range(values.shape[0])]

    def steps(self, field, sequences, eos_token_id=None, *, tail=DEFAULT_TAIL):
        """Each row's per-step measures of ``field`` over its real generated tokens (see
        ``token_mask``): a list of ``fusedecode.steps.StepStatistics`` (count, mean, min, tail, ...),
        equal to ``fusedecode.confidence.step_statistics`` of the row's ``traces(field, ...)`` and
        generated tokens. Needs ``delimiters``; ``sequences`` is what ``generate`` returned."""
        if self.delimiters is None:
            raise ValueError("steps need delimiters: create the processor with UncertaintyProcessor(delimiters=...)")
        steps = self.num_steps
        if sequences.dim() != 2 or sequences.shape[0] != (self._batch or 0) or \
                sequences.shape[1] != (self.prompt_length or 0) + steps:
            raise ValueError(f"sequences must be the [B, prompt + steps] = [{self._batch}, "
                             f"{(self.prompt_length or 0) + steps}] output of the last generate call, "
                             f"got {tuple(sequences.shape)}")
        values = self.traces(field, sequences, eos_token_id)
        if not steps:
            return [statistics_of_spans(row, spans_from_step_indices(torch.zeros(0), False), tail) for row in values]
        index = self.history("step_index")
        # Whether the last token ends its step: the cutter has seen every token but that one.
        _, last_ends = cut_step(self._delimiter_table, self._cutter, sequences[:, -1].to(index.device))
        index = torch.cat([index, (index[:, -1] + last_ends.long()).unsqueeze(1)], dim=1).cpu()
        result = []
        for row, row_values in enumerate(values):
            count = row_values.shape[0]
            last_ends = count > 0 and bool(index[row, count] != index[row, count - 1])
            spans = spans_from_step_indices(index[row, :count], last_ends)
            result.append(statistics_of_spans(row_values, spans, tail))
        return result

    def sequence_self_certainty(self, sequences, eos_token_id=None):
        """Mean self-certainty of each sequence over its real generated tokens: ``[B]``.

        ``sequences`` is what ``generate`` returned (prompt included); tokens after the first EOS do
        not count. Rows with no real token give NaN.
        """
        mask = self.token_mask(sequences, eos_token_id).to(self.self_certainty.device)
        values = torch.where(mask, self.self_certainty[:, :mask.shape[1]], torch.zeros(()))
        return values.sum(1) / mask.sum(1)


def check_confidence_threshold(threshold):
    """A finite float, or a 1-D float64 tensor of finite values (one per row)."""
    if is_real_number(threshold):
        return check_float("threshold", threshold)
    try:
        values = torch.as_tensor(threshold, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"threshold must be a float or one float per row, got {threshold!r}") from None
    if values.dim() != 1 or values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"threshold must be a finite float or a 1-D sequence of finite floats, got {threshold!r}")
    return values


class ConfidenceStopProcessor(UncertaintyProcessor):
    """The logits processor of ``ConfidenceStopping``: an ``UncertaintyProcessor`` (all of its
    histories, ``topk_confidence`` included) that also makes EOS (the first of ``eos_token_ids``)
    the only possible token of a row at the step where the row's group confidence, the mean
    ``topk_confidence`` of its last ``window`` steps (this one included), falls below ``threshold``.
    Rows that already ended with one of ``eos_token_ids`` are left alone. Sync-free: the scores
    pass through one ``torch.where`` per step once ``window`` steps are recorded."""

    def __init__(self, window, threshold, topk, eos_token_ids):
        super().__init__(topk=topk)
        self.window, self.threshold, self.eos_token_ids = window, threshold, tuple(eos_token_ids)

    def _thresholds(self, scores):
        """The threshold as a float, or one per row on the scores' device."""
        if isinstance(self.threshold, float):
            return self.threshold
        if self.threshold.shape[0] != scores.shape[0]:
            raise ValueError(f"threshold has {self.threshold.shape[0]} values (one per row) but the batch has "
                             f"{scores.shape[0]} rows")
        return self.threshold.to(scores.device)

    def reset(self):
        super().reset()
        self.stopped = self._ended = self._window_sum = self._window_counts = None

    def __call__(self, input_ids, scores):
        super().__call__(input_ids, scores)  # a new generate call resets the state first
        confidence = self._steps["topk_confidence"]
        if self.stopped is None:
            if max(self.eos_token_ids) >= scores.shape[-1]:
                raise ValueError(f"eos_token_id {max(self.eos_token_ids)} is outside the vocabulary "
                                 f"({scores.shape[-1]} tokens)")
            self.stopped = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
            self._ended = torch.zeros_like(self.stopped)
            self._eos = torch.tensor(self.eos_token_ids, device=input_ids.device)
            self._window_sum = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
            self._window_counts = torch.zeros(scores.shape[0], 3, dtype=torch.int64, device=scores.device)
        else:  # the token of the previous step is known now: rows that ended there are done
            self._ended = self._ended | torch.isin(input_ids[:, -1], self._eos).to(scores.device)
        # A running sum over the window, as the official processor's deque and running total, kept in
        # parts (fusedecode.confidence.window_parts) so that a NaN or infinite confidence affects only
        # the windows holding it; in float64, where sums of float32 confidences are exact.
        finite, counts = window_parts(confidence[-1])
        self._window_sum, self._window_counts = self._window_sum + finite, self._window_counts + counts
        if len(confidence) > self.window:
            finite, counts = window_parts(confidence[-1 - self.window])
            self._window_sum, self._window_counts = self._window_sum - finite, self._window_counts - counts
        if len(confidence) < self.window:
            return scores
        eos = self.eos_token_ids[0]
        eos_score = scores[:, eos]
        # A row whose EOS another processor masked (min_new_tokens) is not stopped at this step.
        below = window_mean(self._window_sum, self._window_counts, self.window) < self._thresholds(scores)
        stop = below & (eos_score > -math.inf) & ~self._ended
        self.stopped = self.stopped | stop
        self._ended = self._ended | stop
        only_eos = torch.full_like(scores, -math.inf)
        only_eos[:, eos] = eos_score
        return torch.where(stop.unsqueeze(1), only_eos, scores)


class ConfidenceStopping(StoppingCriteria):
    r"""DeepConf's online early stop (Fu et al., 2025), as the authors' vLLM processor does it: at the
    step where a row's group confidence (the mean ``topk_confidence`` of its last ``window`` steps,
    this one included, once ``window`` steps exist) falls below ``threshold``, the row emits EOS
    there and stops (low confidence: the trace is likely wrong).

    Pass both halves to ``generate``: ``stopper.processor`` (a ``ConfidenceStopProcessor``, which
    records every ``UncertaintyProcessor`` history and forces the EOS) in ``logits_processor`` and
    the stopper itself in ``stopping_criteria`` (it stops the rows it forced, whatever the
    generation config's EOS). ``stopper.stopped`` says which rows were stopped early.

    The threshold comes from warm-up traces: ``fusedecode.confidence.confidence_threshold`` of their
    ``lowest_group_confidence`` (16 traces, ``keep_percent=10`` for DeepConf-low); the paper's window is
    2048 tokens. Confidence is measured on the scores as the processors before this one left them
    (the model's raw logits at temperature 1, as the official processor, when it is the first).

    Args:
        window: tokens per group (>= 1).
        threshold: finite float, or one per row (a sequence or 1-D tensor of the batch's size, e.g.
            each problem's calibrated threshold repeated for its ``num_return_sequences`` rows);
            rows below it stop.
        topk: k of the top-k confidence (the paper uses 20).
        eos_token_id: the token emitted at the stopping step, or a list of the tokens that end a row
            (the generation config's EOS ids; the first is emitted): rows that ended with one are
            not stopped again. (A row ended by another criterion, e.g. a stop string, may still be
            marked in ``stopped`` later; its output is unaffected.)

    Example (a threshold above any confidence stops every row at its ``window``-th token, EOS)::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import ConfidenceStopping, bundled_model_path
        >>> path = bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> inputs = tokenizer(["12+34=", "47+385="], return_tensors="pt", padding=True)
        >>> stopper = ConfidenceStopping(window=4, threshold=1e9, eos_token_id=tokenizer.eos_token_id)
        >>> out = model.generate(**inputs, max_new_tokens=30, do_sample=False, logits_processor=[stopper.processor],
        ...                      stopping_criteria=[stopper])
        >>> stopper.stopped.tolist(), out[:, -1].tolist() == [tokenizer.eos_token_id] * 2
        ([True, True], True)
        >>> out.shape[1] - inputs["input_ids"].shape[1]
        4
    """

    def __init__(self, window, threshold, topk=20, *, eos_token_id):
        window = check_int("window", window, 1)
        threshold = check_confidence_threshold(threshold)
        topk = check_int("topk", topk, 1, MAX_TOPK)
        eos_token_ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if not eos_token_ids:
            raise ValueError("eos_token_id must be an int >= 0 or a non-empty list of them (the token emitted at the "
                             "stop first), got an empty list")
        eos_token_ids = [check_int("eos_token_id", e, 0) for e in eos_token_ids]
        self.window, self.threshold = window, threshold
        self.processor = ConfidenceStopProcessor(window, threshold, topk, eos_token_ids)

    @property
    def stopped(self):
        """``[B]`` bool: rows stopped by low confidence in the last ``generate`` call (None before one)."""
        return self.processor.stopped

    def __call__(self, input_ids, scores, **kwargs):
        stopped = self.processor.stopped
        if stopped is None or stopped.shape[0] != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return stopped.to(input_ids.device)
