"""Worker-side traces: one per request (or completion) that asked for fusedecode, with its
parameters in one table that the per-step device code reads by row.

Nothing here imports vLLM. A trace's engine identity (which batch row or slot holds it, how a resumed
request is recognised) belongs to the engine adapters (``_runner_v1.py``, ``_runner_v2.py``).
"""

import itertools
from collections import OrderedDict

import numpy as np
import torch

# Rolling hash of a trace's committed tokens (resumed requests are recognised by it under Model
# Runner V2, which hands over a request's tokens but not its identity).
_HASH_MODULUS = (1 << 61) - 1
_HASH_BASE = 1_000_003


def extend_token_hash(value, tokens):
    for token in tokens:
        value = (value * _HASH_BASE + int(token) + 1) % _HASH_MODULUS
    return value


class Trace:
    """One request as a worker sees it, kept across preemption.

    ``table`` is its row in ``TraceTable`` (0 is never a trace's). ``first_position`` is the first
    generated position this worker measures (0, or the number of tokens a request had when this worker
    first saw it resumed): DeepConf's window counts from there. ``next_position`` and ``token_hash``
    follow the committed tokens delivered so far.
    """

    __slots__ = ("uid", "options", "sender", "stop_token", "table", "first_position", "next_position",
                 "token_hash", "announced", "finished", "engine")

    def __init__(self, uid, options, sender, stop_token, table, first_position):
        self.uid, self.options, self.sender, self.stop_token = uid, options, sender, stop_token
        self.table, self.first_position = table, first_position
        self.next_position, self.token_hash = first_position, 0
        self.announced = False  # the caller learns the uid with its first records
        self.finished = False  # the engine's stop rule fired on a delivered token
        self.engine = None  # what the engine adapter keeps about it

    def commit(self, positions, tokens):
        """Advance over newly delivered tokens (ascending positions; repeats ignored)."""
        for position, token in zip(positions, tokens):
            if position == self.next_position:
                self.token_hash = extend_token_hash(self.token_hash, (token,))
                self.next_position += 1

    @property
    def has_records(self):
        return self.next_position > self.first_position


def stop_token_of(eos_token_id, stop_token_ids):
    """The token DeepConf's early stop emits: EOS, or with ``ignore_eos`` the first stop token."""
    if eos_token_id is not None:
        return int(eos_token_id)
    return int(stop_token_ids[0]) if stop_token_ids else None


class TraceTable:
    """Per-trace parameters the device code gathers by row: a host copy, uploaded when it changed.

    Row 0 belongs to no trace (temperature 1, no early stop): rows of requests that did not ask map
    there, so device code never needs a host-side mask.
    """

    COLUMNS = (("temperature", np.float32), ("topk", np.int64), ("window", np.int64), ("threshold", np.float64),
               ("stop_token", np.int64), ("first_position", np.int64), ("prompt_len", np.int64))

    def __init__(self, device, capacity=16):
        self.device = torch.device(device)
        self.host = {name: np.zeros(capacity, dtype) for name, dtype in self.COLUMNS}
        self.host["temperature"][:] = 1.0
        self._free = list(range(capacity - 1, 0, -1))
        self._device = None

    @property
    def capacity(self):
        return len(self.host["temperature"])

    def take(self, trace_options, stop_token, first_position, prompt_len):
        if not self._free:
            self._grow()
        row = self._free.pop()
        values = {"temperature": trace_options.temperature, "topk": trace_options.topk,
                  "window": trace_options.window or 0, "stop_token": -1 if stop_token is None else stop_token,
                  "threshold": trace_options.threshold if trace_options.threshold is not None else 0.0,
                  "first_position": first_position, "prompt_len": prompt_len}
        self.set(row, **values)
        return row

    def set(self, row, **values):
        for name, value in values.items():
            self.host[name][row] = value
        self._device = None

    def release(self, row):
        self.set(row, temperature=1.0, topk=0, window=0, threshold=0.0, stop_token=-1, first_position=0,
                 prompt_len=0)
        self._free.append(row)

    def _grow(self):
        old = self.capacity
        for name, dtype in self.COLUMNS:
            grown = np.zeros(old, dtype)
            if name == "temperature":
                grown[:] = 1.0
            self.host[name] = np.concatenate([self.host[name], grown])
        self._free = list(range(2 * old - 1, old - 1, -1))
        self._device = None

    def on_device(self):
        """The columns as device tensors (one upload after a change, none otherwise)."""
        if self._device is None:
            self._device = {name: _to_device(values, self.device) for name, values in self.host.items()}
        return self._device


def _to_device(array, device):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=False)


# Trace uids are unique per process, not per engine: the caller tells traces apart by (worker pid,
# uid), and two engines may run in one process (in-process engines, or tests).
_UIDS = itertools.count()


class TraceBook:
    """The traces of one engine: new uids, table rows, and the traces parked while their request is
    out of the batch (preempted, or finished without the worker being told), oldest forgotten first
    beyond ``max_parked``."""

    def __init__(self, device, max_parked=1024):
        self.table = TraceTable(device)
        self.max_parked = max_parked
        self._parked = OrderedDict()  # id(trace) -> (key, trace), oldest first
        self.by_table = {}  # table row -> Trace, for every trace not released
        self.counters = {"traces": 0, "finished": 0, "resumed": 0, "forgotten": 0}

    def new(self, options, sender, stop_token, *, first_position=0, prompt_len=0):
        row = self.table.take(options, stop_token, first_position, prompt_len)
        self.counters["traces"] += 1
        trace = Trace(next(_UIDS), options, sender, stop_token, row, first_position)
        self.by_table[row] = trace
        return trace

    def release(self, trace):
        """The trace is over: free its table row."""
        if trace.table:
            del self.by_table[trace.table]
            self.table.release(trace.table)
            trace.table = 0
            self.counters["finished"] += 1

    def park(self, key, trace):
        self._parked[id(trace)] = (key, trace)
        while len(self._parked) > self.max_parked:
            _, (_, oldest) = self._parked.popitem(last=False)
            self.counters["forgotten"] += 1
            self.release(oldest)

    def parked(self, key):
        """The parked traces under ``key``, oldest first."""
        return [trace for parked_key, trace in self._parked.values() if parked_key == key]

    def unpark(self, trace):
        del self._parked[id(trace)]
        self.counters["resumed"] += 1
        return trace

    def forget_parked(self, predicate):
        """Release the parked traces for which ``predicate(trace)`` holds."""
        for ident, (_, trace) in list(self._parked.items()):
            if predicate(trace):
                del self._parked[ident]
                self.release(trace)

    def __len__(self):
        return len(self._parked)
