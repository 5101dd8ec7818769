"""Model Runner V2 in miniature, for ``ModelRunnerV2Recorder`` tests without vLLM.

It does what ``vllm/v1/worker/gpu/model_runner.py`` does around a logits processor, in the same
order: free the slots of finished and preempted requests (a LIFO free list, as ``RequestState``),
add requests (host fields at once, device writes staged), ``add_request`` on the processor, apply
the staged writes, ``apply_staged_writes`` on the processor; then the step's rows in a shuffled
batch order (one per request, or 1 + drafts under speculative decoding, a prefill chunk that does
not finish the prompt sampling nothing), ``apply`` (split in two calls when asked, as the rejection
sampler does for large batches), greedy sampling of what the processor left (drafts accepted while
they equal it, as strict rejection sampling), and ``post_update`` (tokens appended to
``all_token_ids`` at ``total_len``). The engine's stop rule (EOS, stop tokens, max_tokens) finishes a
request; its slot is freed at the next step. The model is a fixed function of (request, position).

Tensor parallelism: with several recorders (one per rank) every rank adds every request; with
``sharded`` each rank's recorder is given only the rows of the slots it owns (``slot % tp_size``), in
batch order, as ``batch_shard.py`` forms the sub-batches; without it every rank gets every row and
their edits must agree.
"""

import math
import random
from types import SimpleNamespace

import numpy as np
import torch

VOCAB, EOS = 13, 2


class Params:
    """The SamplingParams fields the processor reads."""

    def __init__(self, temperature=1.0, max_tokens=12, ignore_eos=False, stop_token_ids=(), **extra):
        self.temperature, self.extra_args = temperature, dict(extra)
        self.ignore_eos, self.stop_token_ids = ignore_eos, list(stop_token_ids)
        self.eos_token_id = None if ignore_eos else EOS
        self.max_tokens = max_tokens


class HostDevice:
    """A vLLM UVA-backed or staged tensor: ``.np`` on the host, ``.gpu`` on the device."""

    def __init__(self, shape):
        self.np = np.zeros(shape, np.int32)
        self.gpu = torch.zeros(shape, dtype=torch.int32)


class RequestStates:
    """The fields of vLLM's ``LogitsProcRequestState``."""

    def __init__(self, max_num_reqs, max_model_len):
        self.device = torch.device("cpu")
        self.max_num_reqs, self.vocab_size = max_num_reqs, VOCAB
        self.all_token_ids = HostDevice((max_num_reqs, max_model_len))
        self.prompt_len, self.prefill_len = HostDevice(max_num_reqs), HostDevice(max_num_reqs)
        self.total_len = HostDevice(max_num_reqs)


class Request:
    def __init__(self, name, params, prompt):
        self.name, self.params, self.prompt, self.output = name, params, list(prompt), []
        self.slot, self.finished = None, False
        self.computed = self.prefill = 0  # prefill tokens done, of the prefill at (re)admission
        self.committed = 0  # tokens the worker committed (a stop's step may commit a few past it)


def model_row(name, position):
    """The logits the model gives request ``name`` for generated position ``position``."""
    seed = sum(map(ord, name)) * 1000 + position
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    row[EOS] -= 8  # rarely sampled, never at the first positions
    if position < 3:
        row[EOS] = -30.0
    return row


class Runner:
    """One rank's model runner around one recorder (``ModelRunnerV2Recorder``)."""

    def __init__(self, recorder_factory, *, max_num_reqs=4, max_model_len=64, spec_tokens=0, chunk=None,
                 split_apply=False, seed=0, drafts_accepted=0.6, ranks=1, sharded=False):
        self.states = RequestStates(max_num_reqs, max_model_len)
        self.recorders = [recorder_factory(self.states, rank) for rank in range(ranks)]
        self.recorder = self.recorders[0]
        self.sharded = sharded
        self.free = list(range(max_num_reqs))
        self.running, self.finished_slots = [], []
        self.spec_tokens, self.chunk, self.split_apply = spec_tokens, chunk, split_apply
        self.random = random.Random(seed)
        self.drafts_accepted = drafts_accepted
        self.rows_seen = {}  # (name, position) -> logits row as the model produced it
        self.rows_per_step = []

    # -- the engine's bookkeeping
    def add(self, request):
        """A new or resumed request (its prompt plus any output so far is prefilled)."""
        request.slot = self.free.pop()
        request.computed, request.prefill = 0, len(request.prompt) + len(request.output)
        self.running.append(request)
        slot, tokens = request.slot, request.prompt + request.output
        self.states.prompt_len.np[slot] = len(request.prompt)
        self.states.prefill_len.np[slot] = len(tokens)
        self._staged.append((slot, tokens))
        return [recorder.add_request(slot, request.params) for recorder in self.recorders][0]

    def remove(self, request):
        self.running.remove(request)
        self.free.append(request.slot)

    def step(self, add=(), preempt=()):
        """One engine step; returns the add_request answers."""
        for request in [r for r in self.running if r.finished] + list(preempt):
            self.remove(request)
        self._staged = []
        answers = [self.add(request) for request in add]
        for slot, tokens in self._staged:  # RequestState.apply_staged_writes
            self.states.all_token_ids.gpu[slot, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
            self.states.total_len.gpu[slot] = len(tokens)
        for field in (self.states.prompt_len, self.states.prefill_len):
            field.gpu.copy_(torch.from_numpy(field.np))
        for recorder in self.recorders:
            recorder.apply_staged_writes()
        if self.running:
            self._forward_and_sample()
        return answers

    # -- one forward pass
    def _rows_of(self, request):
        """(input position, draft token or None, generated position it samples) per row."""
        done = len(request.prompt) + len(request.output)
        if request.computed < request.prefill:  # prefill, maybe chunked
            end = done if self.chunk is None else min(done, request.computed + self.chunk)
            request.computed = end
            return [(end - 1, None, len(request.output) if end == done else None)]
        last = done - 1
        rows = [(last, None, len(request.output))]
        for j in range(self.spec_tokens):
            position = len(request.output) + j
            target = int(self.model(request, position).argmax())
            draft = target if self.random.random() < self.drafts_accepted else (target + 1 + j) % VOCAB
            rows.append((last + 1 + j, draft, position + 1))
        return rows

    def model(self, request, position):
        row = model_row(request.name, position)
        self.rows_seen[(request.name, position)] = row
        return row

    def _forward_and_sample(self):
        order = list(self.running)
        self.random.shuffle(order)  # rows are reordered every step
        layout, logits_rows = [], []
        for request in order:
            rows = self._rows_of(request)
            for local, (position, draft, generated) in enumerate(rows):
                row = self.model(request, generated) if generated is not None else torch.randn(VOCAB)
                layout.append((request, local, position, draft, generated))
                logits_rows.append(row.clone())
        self.rows_per_step.append(len(layout))
        logits = torch.stack(logits_rows)
        ctx = self._context(layout, order)
        if len(self.recorders) > 1:
            logits = self._apply_on_ranks(logits, layout, order)
        elif self.split_apply and len(order) > 1:
            self._apply_in_two(self.recorder, logits, ctx, layout, order)
        else:
            self.recorder.apply(logits, ctx)
        self._sample(logits, layout)

    def _apply_on_ranks(self, logits, layout, order):
        results = []
        for rank, recorder in enumerate(self.recorders):
            owned = [r for r in order if not self.sharded or r.slot % len(self.recorders) == rank]
            rows = [i for i, entry in enumerate(layout) if entry[0] in owned]
            local = logits[rows].clone()
            sub = [layout[i] for i in rows]
            self._apply_in_two(recorder, local, self._context(sub, owned), sub, owned, split=False)
            results.append((rows, local))
        merged = logits.clone()
        for rows, local in results:
            if self.sharded:
                merged[rows] = local
            else:
                assert torch.equal(local, results[0][1]), "every rank forces the same early stops"
                merged = local
        return merged

    @staticmethod
    def _context(layout, order):
        slots = np.array([request.slot for request in order], np.int32)
        return SimpleNamespace(
            idx_mapping=torch.from_numpy(slots), idx_mapping_np=slots,
            expanded_idx_mapping=torch.tensor([entry[0].slot for entry in layout], dtype=torch.int32),
            expanded_local_pos=torch.tensor([entry[1] for entry in layout], dtype=torch.int32),
            pos=torch.tensor([entry[2] for entry in layout], dtype=torch.int64),
            input_ids=torch.tensor([entry[3] if entry[3] is not None else 0 for entry in layout]),
            seq_lens_upper_bound_np=np.array([entry[2] + 1 for entry in layout]))

    def _apply_in_two(self, recorder, logits, ctx, layout, order, split=True):
        """Two calls over consecutive requests, as the rejection sampler's chunks."""
        if not order:
            return
        if not split:
            logits.copy_(recorder.apply(logits, ctx))
            return
        half = len(order) // 2
        cut = sum(1 for entry in layout if entry[0] in order[:half])
        for start, stop, requests in ((0, cut, order[:half]), (cut, len(layout), order[half:])):
            part = logits[start:stop]
            slots = np.array([request.slot for request in requests], np.int32)
            sub = SimpleNamespace(idx_mapping=torch.from_numpy(slots), idx_mapping_np=slots,
                                  expanded_idx_mapping=ctx.expanded_idx_mapping[start:stop],
                                  expanded_local_pos=ctx.expanded_local_pos[start:stop], pos=ctx.pos[start:stop],
                                  input_ids=ctx.input_ids[start:stop],
                                  seq_lens_upper_bound_np=ctx.seq_lens_upper_bound_np[start:stop])
            out = recorder.apply(part, sub)
            logits[start:stop] = out

    def _sample(self, logits, layout):
        by_request = {}
        for index, entry in enumerate(layout):
            by_request.setdefault(entry[0], []).append((index, entry))
        for request, rows in by_request.items():
            emitted = []
            for index, (_, local, _position, _draft, generated) in rows:
                if generated is None:
                    break  # a prefill chunk that does not finish the prompt: nothing is sampled
                token = int(logits[index].argmax())
                emitted.append(token)
                next_draft = rows[local + 1][1][3] if local + 1 < len(rows) else None
                if next_draft != token:
                    break
            self._post_update(request, emitted)

    def _post_update(self, request, tokens):
        slot, states = request.slot, self.states
        request.committed += len(tokens)
        for token in tokens:
            if request.finished:
                break  # the scheduler drops tokens after a stop (the worker has committed them)
            request.output.append(token)
            params = request.params
            if (token == params.eos_token_id or token in params.stop_token_ids
                    or len(request.output) >= params.max_tokens):
                request.finished = True
        total = int(states.total_len.gpu[slot])
        states.all_token_ids.gpu[slot, total:total + len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        states.total_len.gpu[slot] = total + len(tokens)


def expected_stats(runner, name, tokens, temperature=1.0, topk=0):
    """``logit_stats`` of the rows that produced ``tokens`` (float64 reference)."""
    import fusedecode
    rows = torch.stack([runner.rows_seen[(name, position)] for position in range(len(tokens))])
    return fusedecode.logit_stats(rows, temperature=temperature, topk=topk,
                                  token_ids=torch.tensor(tokens), backend="torch")


def assert_stats_match(stats, expected, tokens, topk=0, tol=1e-5):
    from fusedecode.vllm._channel import STAT_FIELDS
    for name in STAT_FIELDS:
        got = getattr(stats, name)
        want = getattr(expected, name)
        if name == "topk_confidence" and not topk:
            assert got is None or np.isnan(np.asarray(got)).all()
            continue
        np.testing.assert_allclose(np.asarray(got, np.float64), want.numpy(), rtol=tol, atol=tol, err_msg=name)
    assert len(tokens) == len(stats.entropy)


def window_rule_stop(confidence, window, threshold, start=0):
    """DeepConf's rule offline: the first generated position g >= start + window - 1 whose window mean
    is below the threshold, or None."""
    for g in range(start + window - 1, len(confidence)):
        values = confidence[g - window + 1:g + 1]
        if not any(math.isnan(v) for v in values) and sum(values) / window < threshold:
            return g
    return None
