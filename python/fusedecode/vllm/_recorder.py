"""The engine-agnostic core of the vLLM processor, shared by both model runners: one fused
``logit_stats`` call per group of rows, DeepConf's early stop, and records to the caller.

An engine adapter (``_runner_v1.py``, ``_runner_v2.py``) says which logits rows belong to which
trace and, once the engine has committed them, which token each row produced. A step goes:

1. ``measure`` (inside the processor's ``apply``): the rows of the traces that asked are copied (the
   engine edits the logits in place afterwards, and the emitted token is not known yet), measured by
   one ``logit_stats`` call per distinct ``topk`` (normally one), and DeepConf rows below their
   threshold get every token but the stop token set to -inf. No host synchronisation.
2. ``pack`` (once the tokens are committed, on the device): per row its token, whether it was
   emitted, ``token_logprob`` from the kept copy and the statistics, as one float64 tensor.
3. ``deliver``: one device-to-host copy for everything packed since the last delivery, records per
   trace queued for their channel (``Outboxes``), sent by ``flush``.

Nothing here imports vLLM: the bookkeeping is unit-tested with simulated batches.
"""

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from fusedecode import logit_stats

from ._channel import RECORD, STAT_FIELDS, StatsSender
from ._outbox import Outboxes
from ._reflection import Reflections
from ._traces import TraceBook, stop_token_of
from ._windows import ConfidenceWindows

# Columns of the packed per-row tensor: identity first, then reflection insertion (the forced token
# or -1; where an insertion starts the trigger index, value and threshold), then every statistic of
# the output table.
_IDENTITY = ("table", "position", "token", "emitted", "stopped", "slot")
_INSERTION = ("forced", "insertion", "insertion_value", "insertion_threshold")
_COLUMN = {name: index for index, name in enumerate(_IDENTITY + _INSERTION + STAT_FIELDS)}

ASYNC_REFUSAL = ("fusedecode.vllm statistics need synchronous scheduling on vLLM's V1 model runner (the emitted "
                 "token is read from the request's output list, which async scheduling fills with "
                 "placeholders): create the engine with async_scheduling=False, or run Model Runner V2. The "
                 "early stop works either way.")


class RowGroup(NamedTuple):
    """Logits rows measured by one ``logit_stats`` call. Per row (device tensors): ``tables`` (the
    trace's ``TraceTable`` row, 0 for rows measured but not recorded), ``positions`` (generated
    position of the token the row samples) and, for the adapter, ``slots``. ``rows`` selects logits
    rows (None: all of them); ``temperature`` is the one temperature of the recorded rows (None: per
    row, from the table); ``stops`` whether any row has an early stop."""

    rows: Optional[torch.Tensor]
    tables: torch.Tensor
    positions: torch.Tensor
    topk: int
    temperature: Optional[float]
    stops: bool
    slots: Optional[torch.Tensor] = None


class Measured(NamedTuple):
    """A measured group, waiting for its tokens."""

    group: RowGroup
    selected: torch.Tensor  # the rows' logits as measured (divided by per-row temperatures)
    stats: object  # LogitStats of ``selected``
    stopped: Optional[torch.Tensor]  # bool per row: the early stop forced the stop token
    started: Optional[object] = None  # _reflection.Started per row, with reflection insertion


class Delivered(NamedTuple):
    """What one delivery committed for one trace (ascending positions)."""

    trace: object
    positions: np.ndarray
    tokens: np.ndarray
    stopped: bool


class Recorder:
    """Traces, measurement, early stop and records of one engine.

    Args:
        device: the logits' device.
        spare_rows: the most logits rows one request gets in a step (speculative decoding: 1 + the
            number of draft tokens).
        pin_memory: stage host-to-device copies in pinned memory (non-blocking on a GPU).
        refuse_statistics: a reason why statistics cannot be recorded in this engine (requests that
            ask get it as an error; their early stop still runs), or None.
        sender_factory: ``StatsSender`` (tests substitute a fake).
    """

    def __init__(self, device, *, spare_rows=1, pin_memory=False, refuse_statistics=None,
                 sender_factory=StatsSender, max_parked=1024):
        self.device = torch.device(device)
        self.pin_memory, self.refuse_statistics = pin_memory, refuse_statistics
        self.book = TraceBook(self.device, max_parked=max_parked)
        self.windows = ConfidenceWindows(self.device, spare_rows)
        self.reflections = Reflections(self.device)
        self.outboxes = Outboxes(sender_factory)
        self.outboxes.on_drop = self._forget_sender
        self.counters = {"records": 0, "steps": 0}

    # ---------------------------------------------------------------------------- traces
    def admit(self, options, *, reporting, eos_token_id, stop_token_ids, first_position=0, prompt_len=0):
        """A new trace for a request that asked (``options``); ``reporting``: whether this worker
        sends its statistics."""
        sender = self.outboxes.sender_for(options) if reporting else None
        if sender is not None and self.refuse_statistics is not None:
            self.outboxes.refuse(options, self.refuse_statistics)
            sender = None
        trace = self.book.new(options, sender, stop_token_of(eos_token_id, stop_token_ids),
                              first_position=first_position, prompt_len=prompt_len)
        if options.reflection is not None:
            self.reflections.start(options.reflection, trace.table, first_position)
        if options.stops_early:
            self.windows.reserve(self.book.table.capacity, options.window)
        return trace

    def release(self, trace):
        self.book.release(trace)

    def _forget_sender(self, sender):
        for trace in self.book.by_table.values():
            if trace.sender is sender:
                trace.sender = None

    def to_device(self, array):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        if self.pin_memory:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    # ---------------------------------------------------------------------------- step 1: measure
    def measure(self, logits, group):
        """Statistics of ``group``'s rows of ``logits``; the early stop forced in place."""
        table = self.book.table.on_device()
        rows = group.rows if group.rows is not None else torch.arange(logits.shape[0], device=logits.device)
        selected = logits.index_select(0, rows)
        if group.temperature is not None:
            stats = logit_stats(selected, temperature=group.temperature, topk=group.topk)
        else:
            # Per-row temperatures divide the kept copy (a tensor temperature on a GPU would cost
            # logit_stats a host synchronisation to validate it).
            selected.div_(table["temperature"][group.tables].unsqueeze(1))
            stats = logit_stats(selected, topk=group.topk)
        stopped = None
        if group.stops:
            self.windows.reserve(self.book.table.capacity, 1)
            stop_tokens = table["stop_token"][group.tables]
            stop_logit = selected.gather(1, stop_tokens.clamp(min=0).unsqueeze(1)).squeeze(1)
            stop_logit = torch.where(stop_tokens >= 0, stop_logit, torch.full_like(stop_logit, -math.inf))
            stopped = self.windows.decide(table, group.tables, group.positions, stats.topk_confidence, stop_logit)
            self.windows.force(logits, rows, stopped, stop_tokens.clamp(min=0))
        self.counters["steps"] += 1
        return Measured(group, selected, stats, stopped)

    # ---------------------------------------------------------------------------- step 2: pack
    def pack(self, measured, tokens, emitted, subset=None):
        """``[rows, columns]`` float64 on the device: for each row (of ``subset``, an index into the
        group's rows, when given) its identity, ``tokens`` and ``emitted`` (per row of the subset) and
        its statistics, ``token_logprob`` computed from the kept copy."""
        group, stats = measured.group, measured.stats
        pick = (lambda values: values) if subset is None else (lambda values: values.index_select(0, subset))
        selected = pick(measured.selected)
        token_ids = tokens.clamp(0, selected.shape[1] - 1)
        divisor = group.temperature if group.temperature is not None else 1.0
        logsumexp = pick(stats.logsumexp)
        columns = {
            "table": pick(group.tables), "position": pick(group.positions), "token": tokens, "emitted": emitted,
            "stopped": pick(measured.stopped) if measured.stopped is not None else torch.zeros_like(emitted),
            "slot": pick(group.slots) if group.slots is not None else torch.full_like(tokens, -1),
            "token_logprob": selected.gather(1, token_ids.unsqueeze(1)).squeeze(1) / divisor - logsumexp,
        }
        started = measured.started
        columns["forced"] = pick(started.forced) if started is not None else torch.full_like(tokens, -1)
        columns["insertion"] = pick(started.trigger) if started is not None else torch.full_like(tokens, -1)
        for name, part in (("insertion_value", "value"), ("insertion_threshold", "threshold")):
            columns[name] = pick(getattr(started, part)) if started is not None else torch.full_like(logsumexp, math.nan)
        for name in STAT_FIELDS:
            if name not in columns:
                value = getattr(stats, name)
                columns[name] = pick(value) if value is not None else torch.full_like(logsumexp, math.nan)
        return torch.stack([columns[name].to(torch.float64) for name in _COLUMN], 1)

    # ---------------------------------------------------------------------------- step 3: deliver
    def deliver(self, packed_parts, reports=None):
        """Bring the packed rows to the host (one copy), queue each trace's records for its channel
        and commit its tokens. ``reports(slot)`` says whether this worker reports a slot's rows (all
        when None). Returns a ``Delivered`` per trace that got tokens."""
        if not packed_parts:
            return []
        packed = torch.cat(packed_parts).cpu().numpy()
        packed = packed[(packed[:, _COLUMN["emitted"]] > 0) & (packed[:, _COLUMN["table"]] > 0)]
        if not len(packed):
            return []
        tables = packed[:, _COLUMN["table"]].astype(np.int64)
        order = np.lexsort((packed[:, _COLUMN["position"]], tables))
        packed, tables = packed[order], tables[order]
        cuts = np.flatnonzero(tables[1:] != tables[:-1]) + 1
        delivered = []
        for part in np.split(packed, cuts):
            trace = self.book.by_table.get(int(part[0, _COLUMN["table"]]))
            if trace is None:
                continue
            positions = part[:, _COLUMN["position"]].astype(np.int64)
            tokens = part[:, _COLUMN["token"]].astype(np.int64)
            stopped = part[:, _COLUMN["stopped"]] > 0
            if trace.sender is not None and (reports is None or reports(int(part[0, _COLUMN["slot"]]))):
                self.outboxes.queue(trace.sender, trace, self._records(trace, part), positions[stopped])
                self.counters["records"] += len(part)
            trace.commit(positions, tokens)
            delivered.append(Delivered(trace, positions, tokens, bool(stopped.any())))
        return delivered

    @staticmethod
    def _records(trace, part):
        records = np.zeros(len(part), RECORD)
        records["uid"] = trace.uid
        records["position"] = part[:, _COLUMN["position"]]
        records["token"] = part[:, _COLUMN["token"]]
        for name in _INSERTION:
            records[name] = part[:, _COLUMN[name]]
        for name in STAT_FIELDS:
            records[name] = part[:, _COLUMN[name]]
        return records

    def flush(self):
        self.outboxes.flush()
