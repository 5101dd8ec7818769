"""Reflection insertion inside the engine: the rule of ``fusedecode.reflection`` run per trace on the
device, its state kept by ``TraceTable`` row (a trace keeps its row across preemption, so a resumed
request goes on where it was, mid-insertion included).

Per step and per distinct ``ReflectionConfig`` (normally one): ``before_sampling`` with the rows'
statistics, before the token is drawn (tests SRGen's rule, adds the values to the current step,
says which token each row must emit); ``after_token`` with the token each row emitted (ends steps at
delimiters, tests the step triggers). No host synchronisation: rows are gathered from and scattered
back to the per-row state with index tensors.

Nothing here imports vLLM.
"""

import math
from typing import NamedTuple

import torch

from ..reflection import ReflectionRules, new_state, observe_distribution, observe_token, put_rows, take_rows


class Started(NamedTuple):
    """Per measured row: the token forced (-1: free) and, where an insertion starts at this token
    (SRGen's rule: the row's token is its first forced one) or right after it (a step trigger at
    the step this free token ends), the index of the trigger that fired (else -1), the value that
    fired it and the threshold."""

    forced: torch.Tensor
    trigger: torch.Tensor
    value: torch.Tensor
    threshold: torch.Tensor


def _grown(state, rows, rules, device):
    """``state`` with at least ``rows`` rows (new rows: a trace before its first token)."""
    have = state.position.shape[0]
    if have >= rows:
        return state
    extra = new_state(rules, max(rows, 2 * have) - have, device)
    return type(state)(*(None if whole is None else _grown_part(whole, part) for whole, part in zip(state, extra)))


def _grown_part(whole, part):
    if isinstance(whole, tuple):
        return type(whole)(*(_grown_part(w, p) for w, p in zip(whole, part)))
    return torch.cat([whole, part])


class Reflections:
    """The reflection state of one engine's traces, by config and ``TraceTable`` row."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._rules = {}  # config -> ReflectionRules
        self._states = {}  # config -> ReflectionState over table rows

    def start(self, config, table_row, first_position):
        """A new trace in ``table_row`` (its first generated position ``first_position``)."""
        if config not in self._rules:
            self._rules[config] = ReflectionRules.build(config, self.device)
            self._states[config] = new_state(self._rules[config], 16, self.device)
        rules = self._rules[config]
        state = _grown(self._states[config], table_row + 1, rules, self.device)
        fresh = new_state(rules, 1, self.device)
        fresh = fresh._replace(position=torch.full_like(fresh.position, first_position))
        row = torch.tensor([table_row], device=self.device)
        self._states[config] = put_rows(state, row, fresh)

    def before_sampling(self, config, tables, stats, rows, logits_rows, logits):
        """``tables`` ``[n]`` the rows' traces, ``stats`` their ``LogitStats`` (recording temperature),
        ``rows`` ``[n]`` bool the rows that sample a generated token. Forces the token to insert in
        ``logits`` (rows ``logits_rows``) and returns a ``Started``."""
        rules = self._rules[config]
        part = take_rows(self._states[config], tables)
        values = {field: getattr(stats, field) for field in config.fields}
        part, forced = observe_distribution(rules, part, values, rows)
        self._states[config] = put_rows(self._states[config], tables, part)
        forced = torch.where(rows, forced, -1)
        # SRGen's rule starts an insertion at this very token: it is the insertion's first forced one.
        started = _newest_insertion(part, (forced >= 0) & (part.forcing == 0), rules.srgen_index)
        force_tokens(logits, logits_rows, forced)
        return Started(forced, *started)

    def after_token(self, config, tables, tokens, emitted):
        """The token each row emitted (``emitted`` ``[n]`` bool: rows that produced a committed one).
        Returns ``(trigger, value, threshold)`` ``[n]`` of the insertions a step trigger started after
        this token (trigger -1 where none): the token was free, so its record carries them."""
        rules = self._rules[config]
        part = take_rows(self._states[config], tables)
        part = observe_token(rules, part, tokens, emitted)
        self._states[config] = put_rows(self._states[config], tables, part)
        return _newest_insertion(part, emitted & (part.forcing == 0), None)


def _newest_insertion(part, first, srgen_index):
    """``(trigger, value, threshold)`` of each row's newest recorded insertion where ``first`` (and,
    when ``srgen_index`` is given, SRGen's rule made it), else ``(-1, NaN, NaN)``."""
    nan = torch.full(first.shape, math.nan, dtype=torch.float64, device=first.device)
    if not part.record_trigger.shape[1]:  # max_insertions == 0: nothing is ever inserted
        return torch.full_like(part.position, -1), nan, nan
    newest = (part.insertions - 1).clamp(min=0).unsqueeze(1)
    trigger = part.record_trigger.gather(1, newest).squeeze(1)
    if srgen_index is not None:
        first = first & (trigger == srgen_index)
    return (torch.where(first, trigger, -1), torch.where(first, part.record_value.gather(1, newest).squeeze(1), nan),
            torch.where(first, part.record_threshold.gather(1, newest).squeeze(1), nan))


def force_tokens(logits, rows, forced):
    """Rows ``rows`` of ``logits`` with ``forced[i] >= 0`` keep only that token (every other logit
    -inf), in place: whatever the sampler does next (temperature, top-k/p, min-p, greedy), it draws
    that token."""
    target = logits.index_select(0, rows)
    keep = torch.arange(logits.shape[1], device=logits.device) == forced.clamp(min=0).unsqueeze(1)
    pinned = torch.where(keep, torch.zeros_like(target), torch.full_like(target, -math.inf))
    logits.index_copy_(0, rows, torch.where((forced >= 0).unsqueeze(1), pinned, target))
