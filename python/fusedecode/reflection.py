"""Reflection insertion: when a trigger fires, insert a given token sequence into the trace (e.g. the
ids of "Wait, let me check this step.") and let generation continue, at most ``max_insertions`` times
per trace (Iterative Deepening Sampling's self-reflection prompt). Framework-free (torch only): the
rule lives here once, as pure functions over per-row state on the device, for ``fusedecode.hf``'s
logits processor + stopping criteria pair, for the engine integrations, and for the offline replay
``insertion_points``.

**The rule**, per trace (a batch row), the generated tokens numbered from 0 (token 0 comes from the
prompt's forward pass). A token is *inserted* when it is one of a sequence's forced tokens; the others
are *free* (chosen by the model).

- When a trigger fires at position t, the sequence's tokens are forced at t, t+1, ..., t+L-1; the
  next free token is t+L. One insertion at a time; at most ``max_insertions`` per trace.
- ``SRGenTrigger`` (``fusedecode.triggers``): tested at each free token t >= 1 on the entropy of the
  distribution token t is drawn from (at the recording temperature). The tested entropy is recorded
  in the rule's window whether it fires or not; token 0 and inserted tokens are neither tested nor
  recorded. When it fires at t, the sequence replaces the token the model would have drawn at t.
- ``StepTrigger``: tested when a step ends (``fusedecode.steps``: token t-1 completes a delimiter)
  and the step holds no inserted token; when it fires, the sequence starts at t, right after the
  delimiter. The last step of a trace is never tested (no delimiter ends it), and neither is a step
  that contains an inserted token (so a sequence that is itself poorly predicted cannot fire again
  on its own step). Inserted tokens belong to the steps and their statistics like any token.
- Several triggers may be given (at most one ``SRGenTrigger``); at a step end the step triggers are
  tested in order and the first that fires is recorded. A row that has ended (its EOS, or its
  request finished) is never tested again.

Each insertion is recorded as an ``Insertion``: ``position`` (the index of its first token among the
generated tokens), ``trigger`` (the index of the trigger that fired in ``config.triggers``),
``value`` (the entropy, or the step measure, that fired), ``threshold`` (what it was compared with)
and ``inserted`` (how many of the sequence's tokens were emitted as forced: fewer than L when the
length limit, or something after the rule, cut it short).

The online functions, called once per decode step for the rows of a batch (a ``ReflectionState``
holds everything per row; ``take_rows`` / ``put_rows`` move rows of it for engines that keep state per
request slot):

1. ``observe_distribution(rules, state, values, rows)`` with the step's per-token statistics (a dict
   of ``[B]`` tensors: ``entropy`` for the SRGen rule, the step triggers' fields) before the token is
   drawn: tests the SRGen rule, adds the values to the current step, returns ``[B]`` the token to
   force (-1: free);
2. ``observe_token(rules, state, tokens, rows)`` with the token each row emitted: counts inserted
   tokens, ends steps at delimiters, tests the step triggers (an insertion they start is forced from
   the next token on).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from ._validation import ArgumentTypeError, check_int
from .steps import (DelimiterTable, accumulate, check_delimiters, cut_step, new_accumulator, new_cutter, restart_steps,
                    step_measure)
from .triggers import SRGenTrigger, StepTrigger, new_entropy_window, record_entropies, srgen_thresholds

__all__ = ["ReflectionConfig", "Insertion", "ReflectionRules", "ReflectionState", "new_state",
           "observe_distribution", "observe_token", "insertions_of", "take_rows", "put_rows", "insertion_points"]


@dataclass(frozen=True)
class ReflectionConfig:
    r"""What to insert, when, and how often (see the module docstring for the exact rule). Frozen: the
    normalised, validated settings cannot change under a processor that uses them.

    Args:
        tokens: the token ids to insert (a non-empty sequence of ints >= 0).
        triggers: an ``SRGenTrigger``, a ``StepTrigger``, or a sequence of them (at most one
            ``SRGenTrigger``).
        max_insertions: most insertions per trace (>= 0; 0 disables insertion, the rule is still
            measured).
        delimiters: the step delimiters (``fusedecode.steps``), needed by step triggers.

    Example::

        >>> from fusedecode.triggers import StepTrigger
        >>> config = ReflectionConfig(tokens=[11, 12], triggers=StepTrigger(threshold=0.5), delimiters=[[5]])
        >>> config.triggers, config.delimiters
        ((StepTrigger(threshold=0.5, field='entropy', measure='mean', fires_when='above', tail=8),), ((5,),))
        >>> ReflectionConfig(tokens=[11], triggers=StepTrigger(threshold=0.5))
        Traceback (most recent call last):
        ...
        ValueError: delimiters must be given for a StepTrigger (steps end at delimiters)
    """

    tokens: Tuple[int, ...]
    triggers: Tuple[object, ...]
    max_insertions: int = 1
    delimiters: Optional[Tuple[Tuple[int, ...], ...]] = None

    def __post_init__(self):
        if isinstance(self.tokens, (str, bytes)) or not hasattr(self.tokens, "__iter__"):
            raise ArgumentTypeError(f"tokens must be a sequence of token ids, got {type(self.tokens).__name__}")
        tokens = self.tokens.tolist() if hasattr(self.tokens, "tolist") else list(self.tokens)
        if not tokens:
            raise ValueError("tokens is empty: give the token ids to insert")
        object.__setattr__(self, "tokens", tuple(check_int("tokens", token, 0) for token in tokens))
        triggers = (self.triggers,) if isinstance(self.triggers, (SRGenTrigger, StepTrigger)) else self.triggers
        if not hasattr(triggers, "__iter__") or not triggers:
            raise ValueError(f"triggers must be an SRGenTrigger, a StepTrigger or a non-empty sequence of them, "
                             f"got {self.triggers!r}")
        triggers = tuple(triggers)
        for trigger in triggers:
            if not isinstance(trigger, (SRGenTrigger, StepTrigger)):
                raise ArgumentTypeError(f"triggers must hold SRGenTrigger or StepTrigger objects, "
                                        f"got {type(trigger).__name__}")
        if sum(isinstance(t, SRGenTrigger) for t in triggers) > 1:
            raise ValueError("triggers holds more than one SRGenTrigger")
        object.__setattr__(self, "triggers", triggers)
        object.__setattr__(self, "max_insertions", check_int("max_insertions", self.max_insertions, 0))
        if self.delimiters is not None:
            object.__setattr__(self, "delimiters", check_delimiters(self.delimiters))
        elif any(isinstance(t, StepTrigger) for t in triggers):
            raise ValueError("delimiters must be given for a StepTrigger (steps end at delimiters)")

    @property
    def fields(self):
        """The per-token fields the rule reads, in a fixed order (``entropy`` first if SRGen's rule
        is used)."""
        fields = ["entropy"] if self.srgen is not None else []
        for trigger in self.step_triggers:
            if trigger.measure != "count" and trigger.field not in fields:
                fields.append(trigger.field)
        return tuple(fields)

    @property
    def largest_token(self):
        """The largest token id the config names (inserted tokens and delimiters): what an engine's
        vocabulary must hold."""
        return max(self.tokens + sum(self.delimiters or (), ()))

    @property
    def srgen(self):
        """The ``SRGenTrigger`` among the triggers, or None."""
        return next((t for t in self.triggers if isinstance(t, SRGenTrigger)), None)

    @property
    def step_triggers(self):
        return tuple(t for t in self.triggers if isinstance(t, StepTrigger))


class Insertion(NamedTuple):
    """One insertion (see the module docstring)."""

    position: int
    trigger: int
    value: float
    threshold: float
    inserted: int


class ReflectionRules(NamedTuple):
    """A ``ReflectionConfig`` as device tensors, built once (``ReflectionRules.build(config, device)``)."""

    config: ReflectionConfig
    tokens: torch.Tensor                       # [L] int64, the sequence to insert
    delimiters: Optional[DelimiterTable]
    step_fields: Tuple[str, ...]               # the accumulated fields, in config.fields order
    srgen_index: int                           # index of the SRGenTrigger in config.triggers, or -1
    step_indices: Tuple[int, ...]              # indices of the step triggers in config.triggers
    tail: int                                  # values kept per field for tail measures (0: none)

    @classmethod
    def build(cls, config, device="cpu"):
        if not isinstance(config, ReflectionConfig):
            raise ArgumentTypeError(f"config must be a fusedecode.reflection.ReflectionConfig, "
                                    f"got {type(config).__name__}")
        tables = DelimiterTable.build(config.delimiters, device) if config.delimiters is not None else None
        step_fields = tuple(f for f in config.fields if any(t.field == f and t.measure != "count"
                                                                for t in config.step_triggers))
        srgen_index = next((i for i, t in enumerate(config.triggers) if isinstance(t, SRGenTrigger)), -1)
        step_indices = tuple(i for i, t in enumerate(config.triggers) if isinstance(t, StepTrigger))
        tail = max([t.tail for t in config.step_triggers if t.measure == "tail"], default=0)
        return cls(config, torch.tensor(config.tokens, dtype=torch.int64, device=device), tables, step_fields,
                   srgen_index, step_indices, tail)


class ReflectionState(NamedTuple):
    """Everything the rule keeps per row (dimension 0 of every tensor is the row)."""

    position: torch.Tensor        # [B] int64: the index of the row's next generated token
    forcing: torch.Tensor         # [B] int64: index in rules.tokens of the next token to force, -1 when free
    insertions: torch.Tensor      # [B] int64: insertions started
    step_inserted: torch.Tensor   # [B] bool: the current step holds an inserted token
    cutter: object                # steps.CutterState, or None without delimiters
    accumulator: object           # steps.AccumulatorState, or None without step triggers
    entropies: object             # triggers.EntropyWindow, or None without an SRGenTrigger
    record_position: torch.Tensor   # [B, M] int64, -1 where no insertion (M = max_insertions)
    record_trigger: torch.Tensor    # [B, M] int64
    record_value: torch.Tensor      # [B, M] float64
    record_threshold: torch.Tensor  # [B, M] float64
    record_inserted: torch.Tensor   # [B, M] int64


def new_state(rules, batch, device):
    """The state of ``batch`` rows before their first generated token."""
    config = rules.config
    longs = dict(dtype=torch.int64, device=device)
    records = (batch, config.max_insertions)
    return ReflectionState(
        position=torch.zeros(batch, **longs), forcing=torch.full((batch,), -1, **longs),
        insertions=torch.zeros(batch, **longs), step_inserted=torch.zeros(batch, dtype=torch.bool, device=device),
        cutter=new_cutter(batch, rules.delimiters, device) if rules.delimiters is not None else None,
        accumulator=(new_accumulator(batch, len(rules.step_fields), rules.tail, device)
                     if rules.step_indices else None),
        entropies=new_entropy_window(batch, config.srgen.window, device) if rules.srgen_index >= 0 else None,
        record_position=torch.full(records, -1, **longs), record_trigger=torch.full(records, -1, **longs),
        record_value=torch.full(records, torch.nan, dtype=torch.float64, device=device),
        record_threshold=torch.full(records, torch.nan, dtype=torch.float64, device=device),
        record_inserted=torch.zeros(records, **longs))


def _start_insertions(rules, state, fire, trigger, value, threshold, position):
    """Starts an insertion at ``position`` ``[B]`` in the rows where ``fire`` ``[B]`` (which must
    have insertions left) and records it."""
    slot = state.insertions.unsqueeze(1) == torch.arange(rules.config.max_insertions, device=fire.device)
    write = fire.unsqueeze(1) & slot
    return state._replace(
        forcing=torch.where(fire, 0, state.forcing), insertions=state.insertions + fire.long(),
        record_position=torch.where(write, position.unsqueeze(1), state.record_position),
        record_trigger=torch.where(write, trigger.unsqueeze(1), state.record_trigger),
        record_value=torch.where(write, value.double().unsqueeze(1), state.record_value),
        record_threshold=torch.where(write, threshold.double().unsqueeze(1), state.record_threshold))


def observe_distribution(rules, state, values, rows):
    """Before the token at ``state.position`` is drawn: ``values`` maps each field of
    ``rules.config.fields`` to its ``[B]`` statistic of the distribution; ``rows`` ``[B]`` bool are
    the rows still generating. Returns ``(state, forced)``: ``forced`` ``[B]`` int64 is the token each
    row must emit (-1: free)."""
    free = state.forcing < 0
    if rules.srgen_index >= 0:
        rule = rules.config.srgen
        entropy = values["entropy"].float()
        tested = rows & free & (state.position >= 1)
        threshold = srgen_thresholds(state.entropies, rule)
        state = state._replace(entropies=record_entropies(state.entropies, entropy, tested))
        fire = tested & (entropy > threshold) & (state.insertions < rules.config.max_insertions)
        trigger = torch.full_like(state.position, rules.srgen_index)
        state = _start_insertions(rules, state, fire, trigger, entropy, threshold, state.position)
    forcing = (state.forcing >= 0) & rows
    if state.accumulator is not None:
        stacked = torch.stack([values[field].float() for field in rules.step_fields], dim=1) if rules.step_fields \
            else torch.zeros(rows.shape[0], 0, device=rows.device)
        state = state._replace(accumulator=accumulate(state.accumulator, stacked, rows))
    forced = torch.where(forcing, rules.tokens[state.forcing.clamp(min=0)], -1)
    return state._replace(step_inserted=state.step_inserted | forcing), forced


def _step_trigger_firing(rules, state, ended):
    """At the steps that just ended: ``(fire, trigger, value, threshold)`` ``[B]`` of the first step
    trigger that fires (fire False where none does)."""
    fire = torch.zeros_like(ended)
    trigger = torch.full_like(state.position, -1)
    value = torch.full(ended.shape, torch.nan, dtype=torch.float64, device=ended.device)
    threshold = value.clone()
    for index in rules.step_indices:
        step_trigger = rules.config.triggers[index]
        field = rules.step_fields.index(step_trigger.field) if step_trigger.measure != "count" else 0
        measured = step_measure(state.accumulator, step_trigger.measure, field, step_trigger.tail)
        first = ended & ~fire & step_trigger.fires(measured)
        fire = fire | first
        trigger = torch.where(first, index, trigger)
        value = torch.where(first, measured, value)
        threshold = torch.where(first, step_trigger.threshold, threshold)
    return fire, trigger, value, threshold


def observe_token(rules, state, tokens, rows):
    """After the token at ``state.position`` was drawn: ``tokens`` ``[B]`` the emitted ids, ``rows``
    ``[B]`` bool the rows still generating before it. Returns the state, advanced to the next
    position."""
    tokens = tokens.to(torch.int64)
    forcing = (state.forcing >= 0) & rows
    if rules.config.max_insertions:
        emitted = forcing & (tokens == rules.tokens[state.forcing.clamp(min=0)])
        slot = (state.insertions - 1).unsqueeze(1) == torch.arange(rules.config.max_insertions, device=tokens.device)
        state = state._replace(record_inserted=state.record_inserted + (slot & emitted.unsqueeze(1)).long())
    advanced = torch.where(forcing, state.forcing + 1, state.forcing)
    state = state._replace(forcing=torch.where(advanced >= rules.tokens.shape[0], -1, advanced))
    next_position = state.position + 1
    if state.cutter is not None:
        cutter, ended = cut_step(rules.delimiters, state.cutter, tokens, rows)
        state = state._replace(cutter=cutter)
        if state.accumulator is not None:
            tested = ended & ~state.step_inserted & (state.forcing < 0)
            fire, trigger, value, threshold = _step_trigger_firing(rules, state, tested)
            fire = fire & (state.insertions < rules.config.max_insertions)
            state = _start_insertions(rules, state, fire, trigger, value, threshold, next_position)
            state = state._replace(accumulator=restart_steps(state.accumulator, ended))
        state = state._replace(step_inserted=state.step_inserted & ~ended)
    return state._replace(position=next_position)


def insertions_of(state):
    """The recorded insertions, one list of ``Insertion`` per row (reads the device once)."""
    columns = [getattr(state, name).cpu().tolist() for name in
               ("record_position", "record_trigger", "record_value", "record_threshold", "record_inserted")]
    return [[Insertion(*entry) for entry in zip(*(column[row] for column in columns)) if entry[0] >= 0]
            for row in range(state.position.shape[0])]


def _map_rows(function, state):
    return type(state)(*(None if part is None else _map_rows(function, part) if isinstance(part, tuple)
                         else function(part) for part in state))


def take_rows(state, rows):
    """The state of ``rows`` (an index tensor): what an engine gathers from its per-slot buffers."""
    return _map_rows(lambda tensor: tensor.index_select(0, rows), state)


def put_rows(state, rows, part):
    """``state`` with ``rows`` replaced by ``part`` (same structure, one row per index)."""
    parts = iter(part)

    def merge(whole, piece):
        if whole is None:
            return None
        if isinstance(whole, tuple):
            return type(whole)(*(merge(w, p) for w, p in zip(whole, piece)))
        return whole.index_copy(0, rows, piece)

    return type(state)(*(merge(whole, next(parts)) for whole in state))


def insertion_points(tokens, histories, config):
    """Where the rule inserts in one recorded trace: the list of ``Insertion`` the online rule
    records, replayed over the trace's generated ``tokens`` (1-D) and its per-token ``histories``
    (a dict mapping each field of ``config.fields`` to a 1-D history of the same length, e.g.
    ``UncertaintyProcessor.traces(field, ...)[row]``, recorded at the temperature the rule used).

    On a trace generated with the rule this returns exactly the insertions made online. On a trace
    generated without it, the first entry is where the rule would have inserted first; later
    entries assume the inserted tokens were there.

    Example (an entropy above 1.0 at the end of a step, delimiter token 5, inserts [8, 9])::

        >>> from fusedecode.triggers import StepTrigger
        >>> config = ReflectionConfig([8, 9], StepTrigger(threshold=1.0), max_insertions=2, delimiters=[5])
        >>> tokens = [3, 5, 3, 3, 5, 8, 9, 4]
        >>> entropy = [0.5, 0.5, 2.0, 1.5, 1.0, 0.0, 0.0, 0.0]
        >>> insertion_points(tokens, {"entropy": entropy}, config)
        [Insertion(position=5, trigger=0, value=1.5, threshold=1.0, inserted=2)]
    """
    rules = ReflectionRules.build(config)
    tokens = torch.as_tensor(tokens.detach().cpu() if hasattr(tokens, "detach") else tokens, dtype=torch.int64)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    values = {}
    for field in config.fields:
        if field not in histories:
            raise ValueError(f"histories must hold {field!r} (the rule reads {config.fields})")
        history = histories[field]
        history = torch.as_tensor(history.detach().cpu() if hasattr(history, "detach") else history,
                                  dtype=torch.float32)
        if history.shape != tokens.shape:
            raise ValueError(f"histories[{field!r}] has shape {tuple(history.shape)}, tokens {tuple(tokens.shape)}")
        values[field] = history
    state = new_state(rules, 1, "cpu")
    rows = torch.ones(1, dtype=torch.bool)
    for position in range(tokens.shape[0]):
        step_values = {field: history[position:position + 1] for field, history in values.items()}
        state, _ = observe_distribution(rules, state, step_values, rows)
        state = observe_token(rules, state, tokens[position:position + 1], rows)
    return insertions_of(state)[0]
