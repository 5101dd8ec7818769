"""vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``, the default engine since vLLM 0.29): requests
live in persistent slots that are recycled without a remove callback; ``apply`` gets the step's
logits rows with ``LogitsContext`` (row -> slot, each row's input position), rows are reordered every
step, and under speculative decoding a request owns one row per draft token plus one. Committed
tokens are in ``req_states.all_token_ids[slot]`` below ``total_len[slot]``.

How a step goes:

1. ``add_request(slot, params)`` for each request entering the batch (new, or resumed after
   preemption). The slot's previous trace, if any, leaves it. A request that asked gets True back
   (the screened greedy LM head must not run for it).
2. ``apply_staged_writes``, once per step before the forward pass: the previous step's rows get their
   tokens on the device (row with input position ``pos`` produced the token at ``pos + 1``: emitted
   when ``prefill_len <= pos + 1 < total_len``, so a discarded partial-prefill row and a rejected
   draft row leave no record), one device-to-host copy delivers them, then traces that left are
   parked or released and resumed requests are matched to their parked traces.
3. ``apply(logits, ctx)``, once or more per step (the rejection sampler may split a batch): the
   tracked rows are measured (``Recorder.measure``), DeepConf's stop forced in place. No host
   synchronisation: with one row per request the layout is the host's ``idx_mapping_np``; with
   speculative rows every row is measured and rows of requests that did not ask are dropped later.

Tensor parallelism: every rank samples the rows it is given and forces the same early stops. Without
batch-sharded sampling every rank samples every row and rank 0 reports; with it (vLLM 0.29+,
``enable_batch_sharded_sampling``) a slot's rows are reported by the rank that owns it
(``slot % tp_size``), so each row is reported exactly once either way.

Nothing here imports vLLM.
"""


import dataclasses

import numpy as np
import torch

from ._channel import StatsSender
from ._options import REFLECTION, admitted_options
from ._recorder import Recorder, RowGroup
from ._traces import extend_token_hash

REFLECTION_WITH_DRAFTS = (f"extra_args {REFLECTION}: reflection insertion forces one token per decode step, and this "
                          "engine runs speculative decoding (several tokens per step): drop speculative_config")



class _Slot:
    """What the MRV2 adapter keeps of a trace's request: where it is and when the engine ends it
    (``vllm.v1.core.sched.utils.check_stop``: EOS unless ignored, a stop token, max_tokens, the model
    length)."""

    __slots__ = ("slot", "prompt_len", "eos", "stop_tokens", "max_output", "max_total")

    def __init__(self, slot, prompt_len, params, max_model_len):
        self.slot, self.prompt_len = slot, prompt_len
        self.eos = params.eos_token_id
        self.stop_tokens = frozenset(params.stop_token_ids or ())
        self.max_output = params.max_tokens
        self.max_total = max_model_len

    def ends_at(self, positions, tokens):
        """Whether any of these (generated position, token) pairs ends the request."""
        for position, token in zip(positions, tokens):
            if token == self.eos or token in self.stop_tokens:
                return True
            if (self.max_output is not None and position + 1 >= self.max_output) or \
                    self.prompt_len + position + 1 >= self.max_total:
                return True
        return False


class ModelRunnerV2Recorder:
    """Per-request statistics and the early stop for one Model Runner V2 engine.

    Args:
        req_states: vLLM's ``LogitsProcRequestState`` (read only): ``device``, ``max_num_reqs``,
            ``all_token_ids``/``total_len`` (``.gpu``), ``prompt_len``/``prefill_len`` (``.np``, ``.gpu``).
        spare_rows: the most logits rows one request gets in a step (1 + speculative tokens).
        tp_rank, tp_size, sharded: this worker's tensor-parallel rank and size, and whether the engine
            was asked for batch-sharded sampling.
        pin_memory, sender_factory: as ``Recorder``.
    """

    def __init__(self, req_states, *, spare_rows=1, tp_rank=0, tp_size=1, sharded=False, pin_memory=False,
                 sender_factory=StatsSender):
        self.req_states, self.spare_rows = req_states, spare_rows
        self.core = Recorder(req_states.device, spare_rows=spare_rows, pin_memory=pin_memory,
                             sender_factory=sender_factory, max_parked=max(64, 4 * req_states.max_num_reqs))
        self.book = self.core.book
        self.tp_rank, self.tp_size, self.sharded = tp_rank, tp_size, sharded and tp_size > 1
        self._slots = {}  # slot -> Trace
        self._table_of_slot = np.zeros(req_states.max_num_reqs, np.int64)
        self._table_of_slot_device = None
        self._pending = []  # (Measured, token index per row, prefill length per row) waiting for tokens
        self._packed = []  # device tensors of rows whose tokens were gathered, waiting for delivery
        self._leaving = []  # traces whose slot was given to another request, settled after delivery
        self._resumes = []  # (slot, options, params, prompt_len, done): matched after delivery
        self._batch_slots, self._last_batch_slots = set(), set()  # slots in this / the previous step's batch

    @property
    def counters(self):
        return {**self.book.counters, **self.core.counters}

    def reports(self, slot):
        """Whether this rank reports the rows of ``slot``."""
        return slot % self.tp_size == self.tp_rank if self.sharded else self.tp_rank == 0

    # ---------------------------------------------------------------------------- admission
    def add_request(self, slot, params):
        """A request enters ``slot``; True when it asked for fusedecode."""
        self._gather_tokens()  # the slot's committed tokens may be overwritten before the next step
        previous = self._slots.pop(slot, None)
        if previous is not None:
            self._leaving.append(previous)
        self._set_table(slot, 0)
        options = self._reflection_checked(admitted_options(params), params)
        if options is None:
            return False
        prompt_len = int(self.req_states.prompt_len.np[slot])
        done = int(self.req_states.prefill_len.np[slot]) - prompt_len  # output tokens before this fill
        if done > 0:
            self._resumes.append((slot, options, params, prompt_len, done))
        else:
            self._bind(slot, self._new_trace(slot, options, params, prompt_len, 0))
        return True

    def _reflection_checked(self, options, params):
        """``options``, without reflection insertion (and its caller told why) where this engine cannot
        run it: speculative rows, tokens outside the vocabulary, an inserted token that ends the
        request."""
        config = options.reflection if options is not None else None
        if config is None:
            return options
        reason = REFLECTION_WITH_DRAFTS if self.spare_rows > 1 else None
        largest = config.largest_token
        vocab = getattr(self.req_states, "vocab_size", None)
        ending = {params.eos_token_id, *(params.stop_token_ids or ())} & set(config.tokens)
        if reason is None and vocab is not None and largest >= vocab:
            reason = f"extra_args {REFLECTION} holds token {largest}, outside the vocabulary ({vocab} tokens)"
        elif reason is None and ending:
            reason = (f"extra_args {REFLECTION}: the inserted tokens hold {sorted(ending)}, which end the request "
                      "(EOS or a stop token)")
        if reason is None:
            return options
        self.core.outboxes.refuse(options, reason)
        return dataclasses.replace(options, reflection=None)

    def _new_trace(self, slot, options, params, prompt_len, first_position):
        trace = self.core.admit(options, reporting=True, eos_token_id=params.eos_token_id,
                                stop_token_ids=params.stop_token_ids, first_position=first_position,
                                prompt_len=prompt_len)
        trace.engine = _Slot(slot, prompt_len, params, self.req_states.all_token_ids.gpu.shape[1])
        return trace

    def _bind(self, slot, trace):
        self._slots[slot] = trace
        trace.engine.slot = slot
        self._set_table(slot, trace.table)

    def _set_table(self, slot, table):
        if self._table_of_slot[slot] != table:
            self._table_of_slot[slot] = table
            self._table_of_slot_device = None

    # ---------------------------------------------------------------------------- between steps
    def apply_staged_writes(self):
        """Deliver the previous step, settle traces that left, match resumed requests, send."""
        self._gather_tokens()
        self._last_batch_slots, self._batch_slots = self._batch_slots, set()
        delivered = self.core.deliver(self._packed, reports=self.reports)
        self._packed = []
        for item in delivered:
            if item.stopped or item.trace.engine.ends_at(item.positions, item.tokens):
                item.trace.finished = True
        for trace in self._leaving:
            self._settle(trace)
        self._leaving = []
        for resume in self._resumes:
            self._resume(*resume)
        self._resumes = []
        self.core.flush()

    def _gather_tokens(self):
        """Each pending row's committed token and whether it was emitted, on the device."""
        if not self._pending:
            return
        all_token_ids, total_len = self.req_states.all_token_ids.gpu, self.req_states.total_len.gpu
        for measured, token_index, prefill_len, reflecting in self._pending:
            slots = measured.group.slots
            tokens = all_token_ids[slots, token_index.clamp(max=all_token_ids.shape[1] - 1)].long()
            emitted = (measured.group.tables > 0) & (token_index < total_len[slots]) & (token_index >= prefill_len)
            for config, members in reflecting:
                after = self.core.reflections.after_token(config, measured.group.tables[members], tokens[members],
                                                          emitted[members])
                measured = measured._replace(started=_started_after(measured.started, members, after))
            self._packed.append(self.core.pack(measured, tokens, emitted.long()))
        self._pending = []

    def _settle(self, trace):
        """A trace whose slot went to another request: over (released) or maybe preempted (parked)."""
        if trace.finished or not trace.has_records:
            # A trace with no committed token holds nothing a resumed request would need.
            self.core.release(trace)
        else:
            self.book.park(trace.options, trace)

    def _resume(self, slot, options, params, prompt_len, done):
        """A request re-entering with ``done`` output tokens: continue its trace if this worker
        recorded exactly those tokens, else start a new one at position ``done`` (the caller joins the
        pieces; DeepConf's window then counts from there).

        Its trace is parked (its old slot went to another request), or still bound to its old slot:
        vLLM frees a preempted request's slot without telling processors, and the request may come
        back in another slot before the old one is reused. A bound trace is a candidate only if its
        slot was not in the previous step's batch (a running request is in every step's batch)."""
        stale = [trace for other, trace in self._slots.items()
                 if other != slot and other not in self._last_batch_slots and trace.options == options]
        candidates = [trace for trace in self.book.parked(options) + stale if trace.next_position == done]
        trace = None
        if candidates:
            # One device read per resumed request (rare): its output tokens so far.
            tokens = self.req_states.all_token_ids.gpu[slot, prompt_len:prompt_len + done].cpu().numpy()
            for candidate in candidates:
                if candidate.token_hash == extend_token_hash(0, tokens[candidate.first_position:]):
                    trace = candidate
                    break
        if trace is None:
            trace = self._new_trace(slot, options, params, prompt_len, done)
        elif trace in stale:
            del self._slots[trace.engine.slot]
            self._set_table(trace.engine.slot, 0)
            self.book.counters["resumed"] += 1
        else:
            self.book.unpark(trace)
        self._bind(slot, trace)

    # ---------------------------------------------------------------------------- per step
    def apply(self, logits, ctx):
        """Measure the tracked rows of ``logits`` (``[rows, V]`` float32); force early stops in place."""
        self._batch_slots.update(ctx.idx_mapping_np.tolist())
        if not self._slots:
            return logits
        tables_of_batch = self._table_of_slot[ctx.idx_mapping_np]
        if not tables_of_batch.any():
            return logits
        table = self.book.table.on_device()
        if self._table_of_slot_device is None:
            self._table_of_slot_device = self.core.to_device(self._table_of_slot)
        traces = [self.book.by_table[t] for t in tables_of_batch[tables_of_batch > 0]]
        prefill_of_slot = self.req_states.prefill_len.gpu
        for topk in sorted({trace.options.topk for trace in traces}):
            members = [trace for trace in traces if trace.options.topk == topk]
            if logits.shape[0] == len(ctx.idx_mapping_np):  # one row per request: the host knows the layout
                batch_rows = np.flatnonzero(np.isin(tables_of_batch, [trace.table for trace in members]))
                rows = self.core.to_device(batch_rows)
                slots = self.core.to_device(ctx.idx_mapping_np[batch_rows].astype(np.int64))
                tables = self._table_of_slot_device[slots]
                token_index = ctx.pos.index_select(0, rows).long() + 1
            else:  # speculative rows: every row, those of other requests mapped to table row 0
                rows = None
                slots = ctx.expanded_idx_mapping.long()
                tables = self._table_of_slot_device[slots]
                tables = torch.where(table["topk"][tables] == topk, tables, torch.zeros_like(tables))
                token_index = ctx.pos.long() + 1
            temperatures = {trace.options.temperature for trace in members}
            group = RowGroup(rows, tables, token_index - table["prompt_len"][tables], topk,
                             temperatures.pop() if len(temperatures) == 1 else None,
                             any(trace.options.stops_early and trace.stop_token is not None for trace in members),
                             slots)
            measured = self.core.measure(logits, group)
            prefill_len = prefill_of_slot[slots].long()
            reflecting = []
            if rows is not None and any(trace.options.reflection is not None for trace in members):
                measured, reflecting = self._reflect(logits, measured, token_index >= prefill_len,
                                                     tables_of_batch[batch_rows])
            self._pending.append((measured, token_index, prefill_len, reflecting))
        return logits

    def _reflect(self, logits, measured, samples, group_tables):
        """Reflection insertion on a group's rows (one per request: ``_reflection_checked`` keeps it
        from speculative rows), one call per distinct config; ``samples`` ``[n]``: rows that sample a
        generated token (not a partial prefill chunk), ``group_tables`` the rows' tables on the host.
        Returns the measured group with its ``Started`` and ``[(config, member indices)]`` for
        ``after_token``."""
        group = measured.group
        configs = [self.book.by_table[table].options.reflection for table in group_tables.tolist()]
        samples = samples if measured.stopped is None else samples & ~measured.stopped
        started, reflecting = None, []
        for config in dict.fromkeys(configs):
            if config is None:
                continue
            members = self.core.to_device(np.flatnonzero([c == config for c in configs]))
            part = self.core.reflections.before_sampling(config, group.tables[members], _rows_of(measured.stats,
                                                         members), samples[members], group.rows[members], logits)
            started = _started_for(started, members, part, len(configs))
            reflecting.append((config, members))
        return measured._replace(started=started), reflecting


def _rows_of(stats, index):
    """The ``LogitStats`` fields of rows ``index`` (fields not recorded stay None)."""
    return type(stats)(*(None if value is None else value.index_select(0, index) for value in stats))


def _started_for(started, members, part, rows):
    """``Started`` over all ``rows`` of a group, with ``members``' entries from ``part``."""
    if started is None:
        started = type(part)(*(torch.full((rows,), -1 if value.dtype == torch.int64 else float("nan"),
                                          dtype=value.dtype, device=value.device) for value in part))
    return type(part)(*(whole.index_copy(0, members, piece) for whole, piece in zip(started, part)))


def _started_after(started, members, after):
    """``started`` with the insertions a step trigger started after the members' tokens (those
    tokens were free, so their entries are empty)."""
    trigger, value, threshold = (part.index_copy(0, members, torch.where(after[0] >= 0, new, part.index_select(0, members)))
                                 for part, new in zip(started[1:], after))
    return started._replace(trigger=trigger, value=value, threshold=threshold)
