"""Reflection insertion in ``generate``: a logits processor + stopping criteria pair that forces a given
token sequence into a row when a trigger fires (``fusedecode.reflection`` holds the rule)."""

import math

import torch
from transformers import StoppingCriteria

from .._validation import ArgumentTypeError, check_int
from ..reflection import (ReflectionConfig, ReflectionRules, insertions_of, new_state, observe_distribution,
                          observe_token)
from .processors import FIELDS, TOPK_FIELDS, UncertaintyProcessor


class ReflectionProcessor(UncertaintyProcessor):
    """The logits processor of ``ReflectionInsertion``: an ``UncertaintyProcessor`` (every history,
    and ``steps(...)`` with the config's delimiters) that also applies the insertion rule to the
    statistics it records and, in a row that must emit an inserted token, makes that token the only
    possible one (score 0, every other -inf). The statistics are those of the scores as they reach
    it, before the forcing. Sync-free: one ``torch.where`` over the scores per step."""

    def __init__(self, config, eos_token_ids, temperature=1.0, topk=0):
        super().__init__(temperature=temperature, topk=topk, delimiters=config.delimiters)
        self.config, self.eos_token_ids = config, tuple(eos_token_ids)
        self._rules = None

    def reset(self):
        super().reset()
        self.state = self._ended = None
        self._observed = 0  # tokens the stopping criteria has handed over in this generate call

    def __call__(self, input_ids, scores):
        super().__call__(input_ids, scores)  # a new generate call resets the state first
        if self.state is None:
            self._start(input_ids, scores)
        elif self._observed != self.num_steps - 1:
            raise ValueError("ReflectionInsertion: its stopping criteria did not see the last token; pass the "
                             "ReflectionInsertion object in stopping_criteria=[...] as well as its .processor in "
                             "logits_processor=[...] (assisted or speculative decoding, which score several tokens "
                             "per step, are not supported)")
        values = {field: self._steps[field][-1] for field in self.config.fields}
        self.state, forced = observe_distribution(self._rules, self.state, values, ~self._ended)
        only_forced = torch.full_like(scores, -math.inf).scatter_(1, forced.clamp(min=0).unsqueeze(1), 0.0)
        return torch.where((forced >= 0).unsqueeze(1), only_forced, scores)

    def _start(self, input_ids, scores):
        """The first step of a generate call: check the ids against the vocabulary, make the state."""
        vocab, device = scores.shape[-1], input_ids.device
        for name, ids in (("tokens", self.config.tokens), ("eos_token_id", self.eos_token_ids)):
            if max(ids) >= vocab:
                raise ValueError(f"{name} holds token {max(ids)}, outside the vocabulary ({vocab} tokens)")
        if self._rules is None or self._rules.tokens.device != device:
            self._rules = ReflectionRules.build(self.config, device)
        self.state = new_state(self._rules, input_ids.shape[0], device)
        self._ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        self._eos = torch.tensor(self.eos_token_ids, device=device)

    def observe(self, input_ids):
        """After a token was appended (called by the stopping criteria): advance the rule with it."""
        if self.state is None or self._observed != self.num_steps - 1:
            raise ValueError("ReflectionInsertion: the stopping criteria ran without a logits processor call before "
                             "it; pass its .processor in logits_processor=[...] (greedy decoding or sampling only)")
        if input_ids.shape[0] != self.state.position.shape[0]:
            raise ValueError(f"ReflectionInsertion: the stopping criteria got {input_ids.shape[0]} rows, the logits "
                             f"processor {self.state.position.shape[0]}: beam search (num_beams > 1) is not "
                             "supported; use greedy decoding or sampling")
        if input_ids.shape[1] != self._next_length:
            raise ValueError(f"ReflectionInsertion: expected one new token per step ({self._next_length} ids), got "
                             f"{input_ids.shape[1]}: assisted or speculative decoding is not supported")
        token = input_ids[:, -1].to(self._ended.device)
        self.state = observe_token(self._rules, self.state, token, ~self._ended)
        self._ended = self._ended | torch.isin(token, self._eos)
        self._observed += 1

    def forcing_rows(self):
        """``[B]`` bool: the rows whose next token is an inserted one, as far as known before its
        scores are seen (an insertion continuing, or one a step trigger started); None before the
        first step. ``srgen`` does not test or correct these rows."""
        if self.state is None:
            return None
        return (self.state.forcing >= 0) & ~self._ended


class ReflectionInsertion(StoppingCriteria):
    r"""Insert a token sequence (e.g. the ids of "Wait, let me check this step.") into the rows where a
    trigger fires, and let generation go on, at most ``max_insertions`` times per row. The rule, its
    triggers (SRGen's entropy rule over tokens, a threshold on a step measure at a step end) and its
    record are ``fusedecode.reflection``'s; the same rule replays offline with
    ``fusedecode.reflection.insertion_points``.

    Pass both halves to ``generate``: ``inserter.processor`` (a ``ReflectionProcessor``, which records
    every ``UncertaintyProcessor`` history, applies the rule and forces the inserted tokens through
    the scores) in ``logits_processor`` and the object itself in ``stopping_criteria`` (it hands each
    emitted token to the rule and never stops a row). Works with greedy decoding and sampling, batches,
    ``num_return_sequences`` and left padding; inside ``srgen`` (``custom_generate``) too, where
    SRGen neither tests nor corrects the steps whose token is inserted. Beam search, assisted and
    speculative decoding are refused with a ``ValueError`` at their first step, and so is a pair with
    a half missing.

    The forced token gets score 0 and every other token -inf, so the sampling warpers after it
    (temperature, top-k, top-p, which transformers applies last) keep it; a processor placed after
    this one that masks it would make the row's scores all -inf. Rows end at one of
    ``eos_token_id`` and are then left alone; a row ended by another stopping criterion (a stop
    string) is padded by ``generate`` and an insertion started there shows ``inserted`` below the
    sequence's length.

    Args:
        config: a ``fusedecode.reflection.ReflectionConfig`` (tokens, triggers, max_insertions,
            delimiters).
        eos_token_id: the id, or list of ids, that end a row (the generation config's); the inserted
            tokens must not hold one.
        temperature: the temperature the statistics are measured at (use the sampling temperature,
            as SRGen does: its entropy rule reads ``entropy`` at this temperature).
        topk: k of ``topk_confidence`` (> 0 when a step trigger measures it).

    Attributes: ``insertions`` (per row, a list of ``fusedecode.reflection.Insertion``: position,
    trigger, value, threshold, inserted), ``processor``. A new ``generate`` call starts afresh, as
    for ``UncertaintyProcessor`` (call ``inserter.processor.reset()`` before feeding an output plus
    exactly one token back in).

    Example (a step trigger that always fires: the sequence follows the first step's delimiter)::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import ReflectionInsertion, bundled_model_path
        >>> from fusedecode.reflection import ReflectionConfig
        >>> from fusedecode.triggers import StepTrigger
        >>> path = bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> semicolon = tokenizer.convert_tokens_to_ids(";")
        >>> config = ReflectionConfig(tokens=tokenizer.convert_tokens_to_ids(list("0+0+0=0;")),
        ...                           triggers=StepTrigger(threshold=-1.0), delimiters=[semicolon])
        >>> inserter = ReflectionInsertion(config, eos_token_id=tokenizer.eos_token_id)
        >>> inputs = tokenizer(["47+385="], return_tensors="pt")
        >>> out = model.generate(**inputs, max_new_tokens=40, do_sample=False, logits_processor=[inserter.processor],
        ...                      stopping_criteria=[inserter])
        >>> tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[:17]
        '7+5+0=12;0+0+0=0;'
        >>> inserter.insertions[0][0].position, inserter.insertions[0][0].inserted
        (9, 8)
    """

    def __init__(self, config, *, eos_token_id, temperature=1.0, topk=0):
        if not isinstance(config, ReflectionConfig):
            raise ArgumentTypeError(f"config must be a fusedecode.reflection.ReflectionConfig, "
                                    f"got {type(config).__name__}")
        eos_token_ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if not eos_token_ids:
            raise ValueError("eos_token_id must be an int >= 0 or a non-empty list of them, got an empty list")
        eos_token_ids = [check_int("eos_token_id", e, 0) for e in eos_token_ids]
        if set(eos_token_ids) & set(config.tokens):
            raise ValueError(f"tokens holds an eos_token_id ({sorted(set(eos_token_ids) & set(config.tokens))}): an "
                             "inserted EOS would end the row")
        self.config = config
        self.processor = ReflectionProcessor(config, eos_token_ids, temperature=temperature, topk=topk)
        recorded = FIELDS + (TOPK_FIELDS if self.processor.topk else ())
        for field in config.fields:
            if field not in recorded:
                reason = "needs topk > 0" if field in TOPK_FIELDS else "is not known before the token is drawn"
                raise ValueError(f"a trigger measures field {field!r}, which {reason}")

    @property
    def insertions(self):
        """Per row of the last ``generate`` call, its insertions (``fusedecode.reflection.Insertion``),
        in order; None before any call."""
        return None if self.processor.state is None else insertions_of(self.processor.state)

    def __call__(self, input_ids, scores, **kwargs):
        self.processor.observe(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
