"""The parts ``fusedecode.vllm`` shares between vLLM's model runners, without vLLM (runs in `make
test`): the caller's matching of records to completions (a record delivered twice, a completion
recorded in pieces, completions with identical tokens), the collector's shutdown, DeepConf's device
windows against the offline rule (several rows per trace per step, NaN, partial prefill rows), and
the field lists every integration takes from ``logit_stats``' output table."""

import math
import socket
import threading
import time

import numpy as np
import pytest
import torch

from fusedecode.ops.logit_stats import OUTPUTS, float_outputs
from fusedecode.vllm._channel import (RECORD, STAT_FIELDS, StatsCollector, StatsSender, _cover, _ReceivedTrace,
                                      encode_message)
from fusedecode.vllm._traces import TraceTable
from fusedecode.vllm._windows import ConfidenceWindows, segment_cumsum


def records(uid, positions, tokens, entropy=None):
    data = np.zeros(len(positions), RECORD)
    data["uid"], data["position"], data["token"] = uid, positions, tokens
    data["forced"], data["insertion"] = -1, -1
    data["entropy"] = entropy if entropy is not None else np.arange(len(positions))
    return data


def send(collector, key, uid, data, stopped=None, pid=1, sender=None):
    """One worker message announcing ``uid`` with its records (over ``sender``'s connection, or a new one)."""
    own = sender is None
    sender = StatsSender(collector.path, collector._authkey) if own else sender
    header = {"pid": pid, "new": {uid: key}, "stopped": stopped or {}, "errors": {}}
    sender.send(header, data)
    if own:
        sender.close()
    return len(encode_message(header, data))


def wait_for(collector, total_bytes, timeout=5.0):
    """Until the collector's reader threads have queued ``total_bytes`` (every message sent)."""
    deadline = time.monotonic() + timeout
    while collector.bytes_received < total_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert collector.bytes_received == total_bytes


def test_a_record_delivered_twice_keeps_the_later_one():
    with StatsCollector() as collector:
        key, = collector.open_keys(1)
        sender = StatsSender(collector.path, collector._authkey)  # one worker: messages arrive in order
        sent = send(collector, key, 0, records(0, [0, 1, 2], [5, 6, 7], entropy=[1.0, 2.0, 3.0]), sender=sender)
        sent += send(collector, key, 0, records(0, [1], [6], entropy=[9.0]), sender=sender)  # measured again
        wait_for(collector, sent)
        (got, stopped), = collector.take(key, [[5, 6, 7]], timeout=5)
        assert list(got["entropy"]) == [1.0, 9.0, 3.0] and not stopped


def test_a_completion_recorded_in_pieces_is_joined():
    """A request resumed on another worker (or forgotten by its worker while preempted) arrives as
    two traces: positions 0..k-1 and k..; the caller joins them in order."""
    with StatsCollector() as collector:
        key, = collector.open_keys(1)
        send(collector, key, 0, records(0, [3, 4], [8, 9], entropy=[3.0, 4.0]), stopped={0: 4}, pid=2)
        send(collector, key, 0, records(0, [0, 1, 2], [5, 6, 7]), pid=1)
        (got, stopped), = collector.take(key, [[5, 6, 7, 8, 9]], timeout=5)
        assert list(got["position"]) == [0, 1, 2, 3, 4] and list(got["entropy"]) == [0, 1, 2, 3, 4]
        assert stopped
        with pytest.raises(TimeoutError):  # a gap is never papered over
            collector.take(key, [[5, 6, 7, 8, 9, 10]], timeout=0.3)


def test_completions_with_identical_tokens_get_distinct_traces():
    with StatsCollector() as collector:
        key, = collector.open_keys(1)
        send(collector, key, 0, records(0, [0, 1], [4, 4], entropy=[1.0, 1.0]))
        send(collector, key, 1, records(1, [0, 1, 2], [4, 4, 2], entropy=[2.0, 2.0, 2.0]))
        send(collector, key, 2, records(2, [0, 1], [4, 4], entropy=[3.0, 3.0]))
        got = collector.take(key, [[4, 4], [4, 4, 2], [4, 4]], timeout=5)
        firsts = sorted(float(r["entropy"][0]) for r, _ in got)
        assert firsts == [1.0, 2.0, 3.0]
        assert list(got[1][0]["entropy"]) == [2.0, 2.0, 2.0]


def test_cover_prefers_the_trace_reaching_furthest():
    short, long = _ReceivedTrace("k"), _ReceivedTrace("k")
    short.add(records(0, [0, 1], [1, 2]))
    long.add(records(1, [0, 1, 2, 3], [1, 2, 3, 4]))
    tokens = np.array([1, 2, 3], np.int32)
    assert _cover(tokens, [short, long]) == [long]
    assert long.reach(tokens, 0) == 3 and short.reach(tokens, 0) == 2
    assert _cover(np.array([1, 9], np.int32), [short, long]) is None
    assert _cover(np.zeros(0, np.int32), []) == []


def test_close_does_not_hang_when_the_accept_thread_already_returned():
    """close() once woke the accept thread with an authenticated Client, whose handshake waits
    forever when that thread has already seen ``closed`` and returned."""
    collector = StatsCollector()
    accept = next(t for t in threading.enumerate() if t.name == "fusedecode-vllm-accept")
    collector.closed = True
    waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waker.connect(collector.path)
    waker.close()
    accept.join(5)
    assert not accept.is_alive()
    collector.closed = False
    closing = threading.Thread(target=collector.close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "close() hung"


def test_field_lists_come_from_the_output_table():
    from fusedecode.hf.processors import FIELDS, TOPK_FIELDS
    from fusedecode.vllm import TraceStats
    floats = [o.name for o in OUTPUTS if o.dtype == torch.float32]
    assert list(STAT_FIELDS) == floats == list(float_outputs("token_ids", "topk"))
    insertion = ["forced", "insertion", "insertion_value", "insertion_threshold"]
    assert list(RECORD.names) == ["uid", "position", "token"] + insertion + floats
    assert list(TraceStats._fields) == floats + ["stopped", "insertions", "steps"]
    assert set(FIELDS) | set(TOPK_FIELDS) == set(floats) - {"token_logprob"}
    assert "topk_confidence" in TOPK_FIELDS and "topk_confidence" not in FIELDS


# ------------------------------------------------------------------------------------------------
# DeepConf's device windows


def offline_stops(confidence, window, threshold, first):
    """Per position g >= first: whether the rule stops there (window full, no NaN, mean below)."""
    stops = {}
    for g in range(first, len(confidence)):
        values = confidence[g - window + 1:g + 1]
        full = g - first + 1 >= window
        stops[g] = full and not any(math.isnan(v) for v in values) and sum(values) / window < threshold
    return stops


class Options:
    def __init__(self, window, threshold, topk=5):
        self.temperature, self.topk, self.window, self.threshold = 1.0, topk, window, threshold


@pytest.mark.parametrize("spare_rows", [1, 3])
def test_windows_equal_the_offline_rule(spare_rows):
    """Random traces, several rows per trace per step (speculative rows, some rejected and measured
    again), NaN confidences, rows before a trace's first position (partial prefill chunks)."""
    generator = np.random.default_rng(spare_rows)
    table = TraceTable("cpu")
    windows = ConfidenceWindows("cpu", spare_rows=spare_rows)
    traces = []
    for index in range(5):
        window = int(generator.integers(1, 6))
        first = int(generator.integers(0, 3))
        confidence = list(generator.uniform(0, 4, size=40))
        if index == 2:
            confidence[10] = math.nan
        threshold = float(np.median(confidence[:20]))
        row = table.take(Options(window, threshold), 2, first, 0)
        traces.append(dict(row=row, window=window, first=first, confidence=confidence, threshold=threshold,
                           committed=first, stops=offline_stops(confidence, window, threshold, first)))
    windows.reserve(table.capacity, 6)
    checked = 0
    for _step in range(30):
        tables, positions, values, owners = [], [], [], []
        for trace in traces:
            count = int(generator.integers(1, spare_rows + 1))
            start = trace["committed"]
            if generator.random() < 0.2:  # a partial prefill row before the first position
                tables.append(trace["row"])
                positions.append(trace["first"] - 1 - int(generator.integers(0, 3)))
                values.append(float(generator.uniform(0, 4)))
                owners.append(None)
            for g in range(start, min(start + count, len(trace["confidence"]))):
                tables.append(trace["row"])
                positions.append(g)
                values.append(trace["confidence"][g])
                owners.append(trace)
        device = table.on_device()
        stop = windows.decide(device, torch.tensor(tables), torch.tensor(positions),
                              torch.tensor(values, dtype=torch.float32), torch.zeros(len(tables)))
        for flag, g, owner in zip(stop.tolist(), positions, owners):
            if owner is not None:
                assert flag == owner["stops"][g], (owner["window"], owner["first"], g)
                checked += 1
        for trace in traces:  # accept a random prefix of each trace's rows
            measured = [g for g, owner in zip(positions, owners) if owner is trace]
            if measured:
                trace["committed"] = measured[int(generator.integers(0, len(measured)))] + 1
    assert checked > 100


def test_windows_never_stop_where_the_stop_token_is_masked_and_segments_restart():
    table = TraceTable("cpu")
    windows = ConfidenceWindows("cpu")
    row = table.take(Options(1, 10.0), 2, 0, 0)
    windows.reserve(table.capacity, 1)
    device = table.on_device()
    args = (device, torch.tensor([row]), torch.tensor([0]), torch.tensor([1.0]))
    assert not windows.decide(*args, torch.tensor([-math.inf])).item()
    assert windows.decide(*args, torch.tensor([0.0])).item()
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert segment_cumsum(values, torch.tensor([7, 7, 3, 3])).tolist() == [1.0, 3.0, 3.0, 7.0]
