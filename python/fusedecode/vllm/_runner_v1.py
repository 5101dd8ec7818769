"""vLLM's V1 model runner (its CPU build, and GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``): batch rows
are persistent indices that vLLM's ``BatchUpdate`` adds, removes and moves; a request's emitted
tokens are appended to its output list (the object vLLM passed when the request was added).

How a step goes (synchronous scheduling):

1. ``record`` (the processor's ``apply``): the rows of the traces that asked are measured (see
   ``Recorder.measure``); each row's position is its request's output length.
2. ``resolve`` (``update_state`` of the next step): vLLM has appended each request's sampled token
   to its output list, so the token at the recorded position is known; a row whose list did not grow
   was a step vLLM discarded (a partial prefill chunk): it leaves no record and is measured again.
   One device-to-host copy brings the step's records to the host (the GPU is idle here: the runner
   has already waited for the sampled tokens).

A request that leaves the batch is parked while vLLM still holds its ``SamplingParams`` (it was
preempted, or not scheduled for a step) and forgotten once vLLM drops them (finished or aborted). A
re-added request is matched to its parked trace by that params object and its tokens so far.

Nothing here imports vLLM.
"""

import dataclasses
import weakref

import numpy as np

from ._channel import StatsSender
from ._options import REFLECTION, admitted_options
from ._recorder import Recorder, RowGroup

REFLECTION_NEEDS_MRV2 = (f"extra_args {REFLECTION}: reflection insertion runs on Model Runner V2 (vLLM's default "
                         "engine), not on the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


class _Request:
    """What the V1 adapter keeps of a trace's request."""

    __slots__ = ("params_ref", "output")

    def __init__(self, params, output):
        # A weak reference: vLLM dropping the params is how a finish or abort is told from a preemption.
        self.params_ref, self.output = weakref.ref(params), output


def _same_tokens(old, new):
    """Whether two output lists hold the same tokens (ignoring the -1 placeholders of async scheduling)."""
    if old is new:
        return True
    return [t for t in old if t != -1] == [t for t in new if t != -1]


class _Group:
    """The tracked rows sharing one ``topk`` at one batch layout."""

    def __init__(self, recorder, topk, items):
        self.traces = [trace for _, trace in items]
        self.rows = recorder.to_device(np.array([index for index, _ in items], np.int64))
        self.tables = recorder.to_device(np.array([trace.table for trace in self.traces], np.int64))
        temperatures = np.array([trace.options.temperature for trace in self.traces], np.float32)
        self.temperature = float(temperatures[0]) if (temperatures == temperatures[0]).all() else None
        self.topk = topk
        self.stops = any(trace.options.stops_early and trace.stop_token is not None for trace in self.traces)
        self.reports = np.array([trace.sender is not None for trace in self.traces])


class V1Recorder:
    """Per-request statistics and the early stop for one V1 engine's batch.

    Args:
        device: the logits' device.
        reporting: whether this worker sends statistics (one tensor-parallel rank does).
        pin_memory, refuse_statistics, sender_factory: as ``Recorder``.
    """

    def __init__(self, device, *, reporting=True, pin_memory=False, refuse_statistics=None,
                 sender_factory=StatsSender):
        self.core = Recorder(device, spare_rows=1, pin_memory=pin_memory, refuse_statistics=refuse_statistics,
                             sender_factory=sender_factory)
        self.book = self.core.book
        self.reporting = reporting
        self._rows = {}  # batch index -> Trace
        self._groups, self._layout_changed = [], True
        self._pending = []  # (Measured, _Group, positions) of the last step

    @property
    def active(self):
        """Whether any request in the batch asked (else a step costs nothing but this check)."""
        return bool(self._rows)

    @property
    def counters(self):
        return {**self.book.counters, **self.core.counters}

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
        self.book.forget_parked(lambda trace: trace.engine.params_ref() is None)
        self._layout_changed = True

    def _admit(self, params, output):
        """The trace of a request entering the batch: resumed, new, or None if it did not ask."""
        options = admitted_options(params)
        if options is None:
            return None
        if options.reflection is not None:  # recorded after the step, the V1 runner cannot force in time
            self.core.outboxes.refuse(options, REFLECTION_NEEDS_MRV2)
            options = dataclasses.replace(options, reflection=None)
        for trace in self.book.parked(id(params)):
            if trace.engine.params_ref() is params and _same_tokens(trace.engine.output, output):
                self.book.unpark(trace)
                trace.engine.output = output
                return trace
        trace = self.core.admit(options, reporting=self.reporting, eos_token_id=params.eos_token_id,
                                stop_token_ids=params.stop_token_ids, first_position=len(output))
        trace.engine = _Request(params, output)
        return trace

    def _leave(self, trace):
        if trace is None:
            return
        params = trace.engine.params_ref()
        if params is None:
            self.core.release(trace)
        else:
            self.book.park(id(params), trace)

    # ---------------------------------------------------------------------------- per step
    def record(self, logits):
        """Measure the tracked rows of this step's ``[num_reqs, V]`` logits; force the stop token on
        rows whose group confidence fell below their threshold (in place). No host sync."""
        self._pending = []  # a step that was never resolved is measured again
        if not self._rows:
            return
        if self._layout_changed:
            by_topk = {}
            for index in sorted(self._rows):
                trace = self._rows[index]
                by_topk.setdefault(trace.options.topk, []).append((index, trace))
            self._groups = [_Group(self.core, topk, items) for topk, items in by_topk.items()]
            self._layout_changed = False
        for group in self._groups:
            positions = np.array([len(trace.engine.output) for trace in group.traces], np.int64)
            measured = self.core.measure(logits, RowGroup(group.rows, group.tables, self.core.to_device(positions),
                                                          group.topk, group.temperature, group.stops))
            if group.reports.any():
                self._pending.append((measured, group, positions))

    def resolve(self):
        """Turn the last recorded step into records now that its tokens are known; queue them."""
        pending, self._pending = self._pending, []
        parts = []
        for measured, group, positions in pending:
            lengths = np.array([len(trace.engine.output) for trace in group.traces], np.int64)
            known = np.flatnonzero((lengths > positions) & group.reports)
            tokens = np.array([group.traces[j].engine.output[positions[j]] for j in known], np.int64)
            valid = tokens >= 0  # -1: an async-scheduling placeholder (statistics are refused there)
            known, tokens = known[valid], tokens[valid]
            if len(known):
                emitted = self.core.to_device(np.ones(len(known), np.int64))
                parts.append(self.core.pack(measured, self.core.to_device(tokens), emitted,
                                            subset=self.core.to_device(known)))
        self.core.deliver(parts)

    def flush(self):
        """Send what this step produced, one message per channel."""
        self.core.flush()
