"""The engine-agnostic part of the vLLM processor: which batch row is which request, one fused
``logit_stats`` call per step, DeepConf's early stop, and the records sent to the caller.

``FusedecodeLogitsProcessor`` (``processor.py``) feeds this with vLLM's batch updates and logits;
nothing here imports vLLM, so the bookkeeping is unit-tested with simulated batches.

How a step goes (V1 model runner, synchronous scheduling):

1. ``apply`` (``record``): the logits rows of the requests that asked are copied (``index_select``:
   vLLM edits the logits in place after the processors, and the emitted token is not known yet) and
   measured by one ``logit_stats`` call per distinct ``topk`` (normally one). DeepConf rows update
   their window sums on the device and rows below the threshold get every token but the stop token
   set to -inf. No host synchronisation.
2. ``update_state`` of the next step (``resolve``): vLLM has appended each request's sampled token to
   its output list (the same list object it passed when the request was added), so the token at the
   recorded position gives ``token_logprob`` from the kept copy; one device-to-host copy brings the
   step's records to the host, which sends them (the GPU is idle here: the runner has already waited
   for the sampled tokens). A row whose list did not grow was a step vLLM discarded (a partial
   prefill chunk): it leaves no record, and the step is measured again.

A request that leaves the batch is parked while vLLM still holds its ``SamplingParams`` (it was
preempted, or not scheduled for a step) and forgotten once vLLM drops them (finished or aborted). A
re-added request is matched to its parked trace by that params object and its tokens so far.
"""

import itertools
import logging
import math
import os
import weakref

import numpy as np
import torch

from fusedecode import logit_stats

from ._channel import RECORD, STAT_FIELDS, StatsSender
from ._options import options_of

logger = logging.getLogger("fusedecode.vllm")

_PACKED = STAT_FIELDS + ("stopped",)  # the columns of the per-step device-to-host copy

V2_REFUSAL = ("fusedecode.vllm supports vLLM's V1 model runner only, and this engine runs Model Runner V2: "
              "start it with VLLM_USE_V2_MODEL_RUNNER=0 in the environment.")
ASYNC_REFUSAL = ("fusedecode.vllm statistics need synchronous scheduling (the emitted token is read from the "
                 "request's output list, which async scheduling fills with placeholders): create the engine "
                 "with async_scheduling=False. The early stop works either way.")


class _Trace:
    """One request as the worker sees it, kept across preemption."""

    __slots__ = ("uid", "options", "params_ref", "output", "sender", "ring_slot", "stop_token", "first_position")

    def __init__(self, uid, options, params, output, sender, ring_slot):
        self.uid, self.options, self.output, self.sender, self.ring_slot = uid, options, output, sender, ring_slot
        # A weak reference: vLLM dropping the params is how a finish or abort is told from a preemption.
        self.params_ref = weakref.ref(params)
        stop_token = params.eos_token_id  # None when ignore_eos
        if stop_token is None and params.stop_token_ids:
            stop_token = params.stop_token_ids[0]
        self.stop_token = stop_token
        self.first_position = None  # of the first record: the early stop's window starts there


def _same_tokens(old, new):
    """Whether two output lists hold the same tokens (ignoring the -1 placeholders of async scheduling)."""
    if old is new:
        return True
    strip = [t for t in old if t != -1], [t for t in new if t != -1]
    return strip[0] == strip[1]


class _StopRows:
    """The rows of a group that stop early, as device tensors for one batch layout."""

    def __init__(self, members, traces, rows, to_device):
        self.members = np.asarray(members, np.int64)  # positions within the group
        self.members_device = to_device(self.members)
        self.rows = rows[self.members_device]  # logits rows
        self.ring_slots = to_device(np.array([traces[j].ring_slot for j in members], np.int64))
        self.windows = to_device(np.array([traces[j].options.window for j in members], np.int64))
        self.thresholds = to_device(np.array([traces[j].options.threshold for j in members], np.float64))
        self.first_positions = to_device(np.array([traces[j].first_position for j in members], np.int64))
        self.tokens = to_device(np.array([traces[j].stop_token for j in members], np.int64))


class _Group:
    """The tracked rows sharing one ``topk`` at one batch layout: one ``logit_stats`` call per step."""

    def __init__(self, topk, items, to_device):
        self.topk = topk
        self.traces = [trace for _, trace in items]
        self.rows = to_device(np.array([index for index, _ in items], np.int64))
        temperatures = np.array([trace.options.temperature for trace in self.traces], np.float32)
        # One temperature for all rows is passed as a float; per-row temperatures divide the kept copy
        # instead (a tensor temperature on a GPU would cost logit_stats a host sync to validate it).
        self.temperature = float(temperatures[0]) if (temperatures == temperatures[0]).all() else None
        self.temperatures = to_device(temperatures)
        self.reports = np.array([trace.sender is not None for trace in self.traces])
        members = [j for j, trace in enumerate(self.traces) if trace.options.stops_early and trace.stop_token is not None]
        self.stop = _StopRows(members, self.traces, self.rows, to_device) if members else None


class _Pending:
    """A recorded step waiting for its tokens."""

    __slots__ = ("group", "positions", "selected", "stats", "stopped")

    def __init__(self, group, positions, selected, stats, stopped):
        self.group, self.positions, self.selected, self.stats, self.stopped = (
            group, positions, selected, stats, stopped)


class _Outbox:
    """What one channel gets at the end of a step."""

    __slots__ = ("new", "stopped", "errors", "records")

    def __init__(self):
        self.new, self.stopped, self.errors, self.records = {}, {}, {}, []

    def __bool__(self):
        return bool(self.new or self.stopped or self.errors or self.records)


class StepRecorder:
    """Per-request statistics and the early stop for one engine's batch.

    Args:
        device: the logits' device.
        reporting: whether this worker sends statistics (one tensor-parallel rank does).
        pin_memory: stage host-to-device copies in pinned memory (non-blocking on a GPU).
        refuse_statistics: a reason why statistics cannot be recorded in this engine (requests that
            ask get it as an error; their early stop still runs), or None.
        sender_factory: ``StatsSender`` (tests substitute a fake).
    """

    def __init__(self, device, *, reporting=True, pin_memory=False, refuse_statistics=None,
                 sender_factory=StatsSender):
        self.device = torch.device(device)
        self.reporting, self.pin_memory, self.refuse_statistics = reporting, pin_memory, refuse_statistics
        self._sender_factory = sender_factory
        self._uids = itertools.count()
        self._rows = {}  # batch index -> _Trace
        self._parked = {}  # id(params) -> [_Trace] left the batch while vLLM still holds the params
        self._senders = {}  # (path, authkey) -> StatsSender, or None after a failure
        self._outboxes = {}  # StatsSender -> _Outbox
        self._groups, self._layout_changed = [], True
        self._pending = []
        self._vocab = None
        # DeepConf windows, one ring row per stopping trace: cells indexed by position % window.
        self._ring = torch.zeros((0, 1), dtype=torch.float64, device=self.device)
        self._window_sums = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._free_ring_slots = []
        self.counters = {"traces": 0, "finished": 0, "resumed": 0, "records": 0, "steps": 0}

    @property
    def active(self):
        """Whether any request in the batch asked (else a step costs nothing but this check)."""
        return bool(self._rows)

    def _to_device(self, array):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        if self.pin_memory:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    # ---------------------------------------------------------------------------- batch changes
    def update_batch(self, removed, added, moved):
        """vLLM's batch update, in its order: ``removed`` indices, ``added`` (index, params, output
        list), ``moved`` (from, to, is_swap). An index overwritten by an add or a one-way move lost
        its request, whether or not it was listed as removed."""
        if not self._rows and not added:
            return
        for index in removed:
            self._leave(self._rows.pop(index, None))
        for index, params, output in added:
            self._leave(self._rows.pop(index, None))
            trace = self._admit(params, output)
            if trace is not None:
                self._rows[index] = trace
        for source, target, is_swap in moved:
            moving, resident = self._rows.pop(source, None), self._rows.pop(target, None)
            if is_swap:
                if resident is not None:
                    self._rows[source] = resident
            else:
                self._leave(resident)
            if moving is not None:
                self._rows[target] = moving
        self._forget_finished()
        self._layout_changed = True

    def _admit(self, params, output):
        """The trace of a request entering the batch: resumed, new, or None if it did not ask."""
        try:
            options = options_of(params)
        except ValueError as error:  # validate_params let it through: never take the engine down
            logger.warning("fusedecode: ignoring a request with invalid options: %s", error)
            return None
        if options is None:
            return None
        for trace in self._parked.get(id(params), ()):
            if trace.params_ref() is params and _same_tokens(trace.output, output):
                self._parked[id(params)].remove(trace)
                trace.output = output
                self.counters["resumed"] += 1
                return trace
        sender = self._sender_for(options)
        uid = next(self._uids)
        if sender is not None:
            if self.refuse_statistics is not None:
                self._outboxes[sender].errors[options.key] = self.refuse_statistics
                sender = None
            else:
                self._outboxes[sender].new[uid] = options.key
        ring_slot = self._take_ring_slot(options.window) if options.stops_early else -1
        self.counters["traces"] += 1
        return _Trace(uid, options, params, output, sender, ring_slot)

    def _leave(self, trace):
        if trace is None:
            return
        params = trace.params_ref()
        if params is None:
            self._finish(trace)
        else:
            self._parked.setdefault(id(params), []).append(trace)

    def _forget_finished(self):
        for key in list(self._parked):
            alive = []
            for trace in self._parked[key]:
                if trace.params_ref() is None:
                    self._finish(trace)
                else:
                    alive.append(trace)
            if alive:
                self._parked[key] = alive
            else:
                del self._parked[key]

    def _finish(self, trace):
        self.counters["finished"] += 1
        if trace.ring_slot >= 0:
            self._free_ring_slots.append(trace.ring_slot)

    def _take_ring_slot(self, window):
        capacity, width = self._ring.shape
        if window > width:
            self._ring = torch.cat([self._ring, self._ring.new_zeros((capacity, window - width))], 1)
        if not self._free_ring_slots:
            grown = max(8, capacity)
            self._ring = torch.cat([self._ring, self._ring.new_zeros((grown, self._ring.shape[1]))])
            self._window_sums = torch.cat([self._window_sums, self._window_sums.new_zeros(grown)])
            self._free_ring_slots = list(range(capacity + grown - 1, capacity - 1, -1))
        slot = self._free_ring_slots.pop()
        self._ring[slot] = 0.0
        self._window_sums[slot] = 0.0
        return slot

    def _sender_for(self, options):
        if not options.reports or not self.reporting:
            return None
        ident = (options.channel, options.authkey)
        if ident not in self._senders:
            try:
                sender = self._sender_factory(options.channel, options.authkey)
            except Exception as error:  # a bad or stale channel must not take the engine down
                logger.warning("fusedecode: cannot open the statistics channel %s: %s", options.channel, error)
                sender = None
            self._senders[ident] = sender
            if sender is not None:
                self._outboxes[sender] = _Outbox()
        return self._senders[ident]

    # ---------------------------------------------------------------------------- per step
    def record(self, logits):
        """Measure the tracked rows of this step's ``[num_reqs, V]`` logits; force the stop token on
        rows whose group confidence fell below their threshold (in place). No host sync."""
        self._pending = []  # a step that was never resolved is measured again
        if not self._rows:
            return
        traces = list(self._rows.values())
        positions_of = {id(trace): len(trace.output) for trace in traces}
        if self._layout_changed:
            for trace in traces:
                if trace.first_position is None:
                    trace.first_position = positions_of[id(trace)]
            by_topk = {}
            for index in sorted(self._rows):
                trace = self._rows[index]
                by_topk.setdefault(trace.options.topk, []).append((index, trace))
            self._groups = [_Group(topk, items, self._to_device) for topk, items in by_topk.items()]
            self._layout_changed = False
        self.counters["steps"] += 1
        for group in self._groups:
            positions = np.array([positions_of[id(trace)] for trace in group.traces], np.int64)
            selected = logits.index_select(0, group.rows)
            if group.temperature is not None:
                stats = logit_stats(selected, temperature=group.temperature, topk=group.topk)
            else:
                selected.div_(group.temperatures.unsqueeze(1))
                stats = logit_stats(selected, topk=group.topk)
            stopped = self._stop_early(group, logits, selected, stats, positions) if group.stop else None
            if group.reports.any():
                self._pending.append(_Pending(group, positions, selected, stats, stopped))

    def _stop_early(self, group, logits, selected, stats, positions):
        """DeepConf's rule, as ``fusedecode.hf.ConfidenceStopping``: once ``window`` tokens exist, a
        row whose mean ``topk_confidence`` over its last ``window`` tokens (this one included) is below
        its threshold emits the stop token now, unless vLLM masked that token (min_tokens)."""
        stop = group.stop
        position = self._to_device(positions[stop.members])
        confidence = stats.topk_confidence.index_select(0, stop.members_device).double()
        column = position % stop.windows
        # Each cell holds the latest value written at its column; replacing it keeps the window sum
        # exact also when a discarded step is measured again at the same position.
        previous = self._ring[stop.ring_slots, column]
        self._ring[stop.ring_slots, column] = confidence
        sums = self._window_sums.index_select(0, stop.ring_slots) + (confidence - previous)
        self._window_sums.index_copy_(0, stop.ring_slots, sums)
        stop_logit = selected[stop.members_device, stop.tokens]
        below = ((position - stop.first_positions + 1 >= stop.windows) & (sums / stop.windows < stop.thresholds)
                 & (stop_logit > -math.inf))
        vocab_size = logits.shape[-1]
        if self._vocab is None or self._vocab.numel() != vocab_size:
            self._vocab = torch.arange(vocab_size, device=self.device)
        masked = below.unsqueeze(1) & (self._vocab.unsqueeze(0) != stop.tokens.unsqueeze(1))
        # Adding -inf to every other token (0 elsewhere) leaves the stop token's logit as it was:
        # only it can be sampled, whatever vLLM does after the processors.
        penalty = torch.zeros(masked.shape, dtype=logits.dtype, device=logits.device).masked_fill_(masked, -math.inf)
        logits.index_add_(0, stop.rows, penalty)
        stopped = torch.zeros(len(group.traces), dtype=torch.bool, device=self.device)
        stopped[stop.members_device] = below
        return stopped

    def resolve(self):
        """Turn the last recorded step into records now that its tokens are known; queue them."""
        pending, self._pending = self._pending, []
        parts = []
        for step in pending:
            traces = step.group.traces
            lengths = np.array([len(trace.output) for trace in traces], np.int64)
            known = np.flatnonzero((lengths > step.positions) & step.group.reports)
            if not len(known):
                continue
            tokens = np.array([traces[j].output[step.positions[j]] for j in known], np.int64)
            valid = tokens >= 0  # -1: an async-scheduling placeholder (statistics are refused there)
            known, tokens = known[valid], tokens[valid]
            if len(known):
                parts.append((step, known, tokens))
        if not parts:
            return
        packed = torch.cat([self._pack(step, known, tokens) for step, known, tokens in parts]).cpu().numpy()
        offset = 0
        for step, known, tokens in parts:
            self._queue_records(step, known, tokens, packed[offset:offset + len(known)])
            offset += len(known)

    def _pack(self, step, known, tokens):
        """``[len(known), len(_PACKED)]`` float32 on the device: the statistics, token_logprob, stopped."""
        rows, token_ids = self._to_device(known), self._to_device(tokens)
        stats = step.stats
        divisor = step.group.temperature if step.group.temperature is not None else 1.0
        token_logprob = step.selected[rows, token_ids] / divisor - stats.logsumexp[rows]
        columns = {"token_logprob": token_logprob}
        for name in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob"):
            columns[name] = getattr(stats, name)[rows]
        columns["topk_confidence"] = (stats.topk_confidence[rows] if stats.topk_confidence is not None
                                      else torch.full_like(token_logprob, math.nan))
        columns["stopped"] = (step.stopped[rows].float() if step.stopped is not None
                              else torch.zeros_like(token_logprob))
        return torch.stack([columns[name].float() for name in _PACKED], 1)

    def _queue_records(self, step, known, tokens, values):
        traces = step.group.traces
        records = np.zeros(len(known), RECORD)
        records["uid"] = [traces[j].uid for j in known]
        records["position"] = step.positions[known]
        records["token"] = tokens
        for column, name in enumerate(STAT_FIELDS):
            records[name] = values[:, column]
        stopped = values[:, len(STAT_FIELDS)] > 0
        senders = [traces[j].sender for j in known]  # None: its channel closed since the step
        for sender in dict.fromkeys(senders):
            if sender is None:
                continue
            outbox = self._outboxes[sender]
            mine = np.array([s is sender for s in senders])
            outbox.records.append(records[mine])
            for uid, position in zip(records["uid"][mine & stopped], records["position"][mine & stopped]):
                outbox.stopped[int(uid)] = int(position)
        self.counters["records"] += len(known)

    def flush(self):
        """Send what this step produced, one message per channel."""
        for sender, outbox in list(self._outboxes.items()):
            if not outbox:
                continue
            header = {"pid": os.getpid(), "new": outbox.new, "stopped": outbox.stopped, "errors": outbox.errors}
            records = np.concatenate(outbox.records) if outbox.records else np.zeros(0, RECORD)
            self._outboxes[sender] = _Outbox()
            try:
                sender.send(header, records)
            except (OSError, EOFError, ValueError) as error:  # the caller went away
                logger.warning("fusedecode: statistics channel %s closed (%s); its requests are no longer "
                               "reported", sender.path, error)
                self._drop_sender(sender)

    def _drop_sender(self, sender):
        del self._outboxes[sender]
        for ident, known in self._senders.items():
            if known is sender:
                self._senders[ident] = None
        for trace in itertools.chain(self._rows.values(), *self._parked.values()):
            if trace.sender is sender:
                trace.sender = None
        self._layout_changed = True
        try:
            sender.close()
        except OSError:
            pass

    def refuse(self, options, reason):
        """Tell the caller of a request that asked for statistics why it gets none."""
        sender = self._sender_for(options)
        if sender is not None:
            self._outboxes[sender].errors[options.key] = reason
