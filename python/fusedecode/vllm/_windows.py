"""DeepConf's online early stop inside the engine, on the device, with no host synchronisation.

The rule (``fusedecode.hf.ConfidenceStopping``, ``fusedecode.confidence``): once a trace has
``window`` generated tokens, the token at generated position g is forced to be the stop token when
the mean ``topk_confidence`` of positions g - window + 1 .. g (this one included) is below the
trace's threshold, unless the engine masked the stop token (``min_tokens``). A window's mean is
``fusedecode.confidence.window_mean`` of its parts: a NaN (or both infinities) in it gives NaN,
which never stops, and a non-finite confidence affects only the windows holding it.

Each trace keeps prefix sums ``P[g]`` of its confidences' ``window_parts`` up to g (the finite sum,
and the counts of NaN, +inf and -inf) in a ring of ``window + spare_rows`` cells, so a window sum is ``P[g] - P[g - window]``. A step may
measure several positions of one trace (speculative decoding: one row per draft token, rows of a
request contiguous and in order); ``spare_rows`` is the most rows one trace gets per step, so the
cells a step writes never overwrite a cell that the windows of that step still need. Rows of a step
that the engine rejects are measured again at the next step and their cells overwritten: a stored
``P[g]`` is only read back for positions before the first row of a later step, which are committed.
"""

import math

import torch

from ..confidence import window_mean, window_parts


def segment_cumsum(values, segments):
    """Cumulative sums restarting wherever ``segments`` (per row) changes from the previous row."""
    total = values.cumsum(0)
    index = torch.arange(len(values), device=values.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    return total - total[first] + values[first]


class ConfidenceWindows:
    """Prefix-sum rings of every trace that stops early, indexed by its ``TraceTable`` row."""

    def __init__(self, device, spare_rows=1):
        self.device = torch.device(device)
        self.spare_rows = int(spare_rows)
        self._sums = torch.zeros((1, 1), dtype=torch.float64, device=self.device)
        self._counts = torch.zeros((1, 1, 3), dtype=torch.int64, device=self.device)
        self._vocab = None

    def reserve(self, rows, window):
        """Room for table rows < ``rows`` with windows up to ``window``."""
        need_rows, need_cells = max(rows, self._sums.shape[0]), max(window + self.spare_rows, self._sums.shape[1])
        if (need_rows, need_cells) != tuple(self._sums.shape):
            sums = self._sums.new_zeros((need_rows, need_cells))
            counts = self._counts.new_zeros((need_rows, need_cells, 3))
            sums[:self._sums.shape[0], :self._sums.shape[1]] = self._sums
            counts[:self._counts.shape[0], :self._counts.shape[1]] = self._counts
            self._sums, self._counts = sums, counts

    def decide(self, table, tables, positions, confidence, stop_logit):
        """Which rows stop now. ``table``: the ``TraceTable`` columns on the device; per row:
        ``tables`` (0 or a trace without an early stop: never), ``positions`` (generated position),
        ``confidence`` (``topk_confidence``), ``stop_logit`` (the stop token's logit as the engine left
        it). Rows of one trace must be contiguous with ascending positions."""
        # Rows before a trace's first position (a partial prefill chunk) count as no trace's.
        tables = torch.where(positions >= table["first_position"][tables], tables, torch.zeros_like(tables))
        window = table["window"][tables]
        ring = window + self.spare_rows
        first = table["first_position"][tables]
        values, kinds = window_parts(confidence)

        # The prefix sums just before each trace's first row of this step, then through its rows.
        row_index = torch.arange(len(tables), device=tables.device)
        starts = torch.ones_like(tables, dtype=torch.bool)
        starts[1:] = tables[1:] != tables[:-1]
        first_row = torch.cummax(torch.where(starts, row_index, torch.zeros_like(row_index)), 0).values
        before = positions[first_row] - 1
        sums = self._read(self._sums, tables, before, first, ring) + segment_cumsum(values, tables)
        counts = self._read(self._counts, tables, before, first, ring) + segment_cumsum(kinds, tables)
        column = positions.clamp(min=0) % ring.clamp(min=1)
        self._sums.index_put_((tables, column), sums)
        self._counts.index_put_((tables, column), counts)

        back = positions - window
        window_sum = sums - self._read(self._sums, tables, back, first, ring)
        window_counts = counts - self._read(self._counts, tables, back, first, ring)
        full = (window > 0) & (positions - first + 1 >= window)
        mean = window_mean(window_sum, window_counts, window.clamp(min=1))
        return full & (mean < table["threshold"][tables]) & (stop_logit > -math.inf)

    @staticmethod
    def _read(cells, tables, positions, first, ring):
        """``P[position]`` per row; 0 before the trace's first position."""
        valid = positions >= first
        column = positions.clamp(min=0) % ring.clamp(min=1)
        read = cells[tables, column]
        valid = valid.view(-1, *([1] * (read.dim() - 1)))
        return torch.where(valid, read, torch.zeros((), dtype=cells.dtype, device=cells.device))

    def force(self, logits, rows, stop, stop_tokens):
        """Leave only the stop token samplable on the ``rows`` of ``logits`` where ``stop`` holds: every
        other token gets -inf added (the stop token's logit is left as it was, whatever the engine
        does after the processors)."""
        vocab_size = logits.shape[-1]
        if self._vocab is None or self._vocab.numel() != vocab_size or self._vocab.device != logits.device:
            self._vocab = torch.arange(vocab_size, device=logits.device)
        masked = stop.unsqueeze(1) & (self._vocab.unsqueeze(0) != stop_tokens.unsqueeze(1))
        penalty = torch.zeros(masked.shape, dtype=logits.dtype, device=logits.device).masked_fill_(masked, -math.inf)
        logits.index_add_(0, rows, penalty)
