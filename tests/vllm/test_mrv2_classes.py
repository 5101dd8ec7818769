"""``FusedecodeLogitsProcessor`` against vLLM's own Model Runner V2 classes: built by vLLM's loaders
(FQCN, class, entry point), given vLLM's ``LogitsProcRequestState`` of a real ``RequestState``, and
driven by vLLM's ``Sampler`` and ``RejectionSampler`` with vLLM's ``post_update``, in the order
``model_runner.py`` calls them, on CPU tensors. The Sampler tests need vLLM's Triton kernels:
``.ci/vllm_check.sh`` runs them in its Model Runner V2 pass (Triton's interpreter); the loader
tests run in both passes."""

import dataclasses
import importlib
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")
v2_loader = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.loader",
                                reason="this vLLM has no Model Runner V2")

import fusedecode  # noqa: E402
import fusedecode.vllm as fv  # noqa: E402
from engine_helpers import PROCESSOR, write_entry_point  # noqa: E402
from fusedecode.vllm._api import _trace_stats  # noqa: E402
from fusedecode.vllm._channel import STAT_FIELDS  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.triton_utils import HAS_TRITON  # noqa: E402

NAMES = [PROCESSOR, "fusedecode.vllm.processor:FusedecodeLogitsProcessor"]
VOCAB, EOS = 19, 2
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="vLLM's MRV2 kernels need Triton: .ci/vllm_check.sh runs "
                                                         "these in its Model Runner V2 pass (TRITON_INTERPRET=1)")


def test_both_runners_loaders_accept_the_class(tmp_path, monkeypatch):
    from vllm.v1.sample import logits_processor as v1_loader
    cls = fv.FusedecodeLogitsProcessor
    assert v2_loader._load_v2_logitsprocs_by_fqcns(NAMES + [cls]) == [cls] * 3
    assert v1_loader._load_logitsprocs_by_fqcns(NAMES + [cls]) == [cls] * 3
    write_entry_point(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert cls in v2_loader._load_v2_logitsprocs_plugins()
    assert cls in v1_loader._load_logitsprocs_plugins()
    validate = v2_loader.build_custom_logits_processors_params_validator(NAMES[:1])
    validate(SamplingParams(extra_args={"fusedecode_topk": 3}))
    from vllm.exceptions import VLLMValidationError
    with pytest.raises(VLLMValidationError, match="fusedecode_topk"):  # the request fails at admission
        validate(SamplingParams(extra_args={"fusedecode_topk": 65}))


# ------------------------------------------------------------------------------------------------
# vLLM's Sampler and RejectionSampler on CPU tensors


@pytest.fixture
def cpu_buffers(monkeypatch):
    """vLLM's buffers without pinned memory (this torch has none on CPU): its own fallback class."""
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)


def input_batch(**fields):
    """vLLM's ``InputBatch`` with the fields the samplers read (the others None)."""
    from vllm.v1.worker.gpu.input_batch import InputBatch
    values = {field.name: None for field in dataclasses.fields(InputBatch)}
    values.update(fields)
    return InputBatch(**values)


class Rank:
    """One tensor-parallel rank's request state, processor and samplers."""

    def __init__(self, config, spec_tokens, max_num_reqs, max_model_len, rank, tp_size, sharded):
        from vllm.v1.worker.gpu.sample.sampler import Sampler
        from vllm.v1.worker.gpu.states import RequestState
        device = torch.device("cpu")
        self.rank, self.tp_size = rank, tp_size
        self.states = RequestState(max_num_reqs, max_model_len, 64, spec_tokens, VOCAB, device)
        with _tensor_parallel(rank, tp_size):
            self.processors = v2_loader.build_custom_logits_processors(config, self.states, False, [PROCESSOR])
        assert len(self.processors) == 1 and isinstance(self.processors[0], fv.FusedecodeLogitsProcessor)
        self.sampler = Sampler(config, max_num_reqs, VOCAB, device, self.states, custom_logits_processors=self.processors)
        self.rejection = None
        if spec_tokens:
            from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler
            spec = SimpleNamespace(num_speculative_tokens=spec_tokens, enable_adaptive_verification=False,
                                   rejection_sample_method="strict", synthetic_acceptance_rates=None)
            self.rejection = RejectionSampler(self.sampler, spec, device)
        self.sharder = None
        if sharded:
            from vllm.v1.worker.gpu.sample import batch_shard
            with _tensor_parallel(rank, tp_size, batch_shard):
                self.sharder = batch_shard.BatchSharder(max_num_reqs, 1 + spec_tokens, device)

    def sample(self, logits, batch):
        if batch.num_draft_tokens and self.rejection is not None:
            return self.rejection(logits, batch)
        return self.sampler(logits, batch)


class _tensor_parallel:
    """vLLM's tensor-parallel rank and size as the processor and BatchSharder ask for them."""

    def __init__(self, rank, size, batch_shard=None):
        self.group = SimpleNamespace(rank_in_group=rank, world_size=size)
        self.rank, self.size, self.batch_shard = rank, size, batch_shard

    def __enter__(self):
        import vllm.distributed as distributed
        self.saved = [(distributed, name, getattr(distributed, name)) for name in
                      ("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size")]
        distributed.get_tensor_model_parallel_rank = lambda: self.rank
        distributed.get_tensor_model_parallel_world_size = lambda: self.size
        if self.batch_shard is not None:
            self.saved.append((self.batch_shard, "get_tp_group", self.batch_shard.get_tp_group))
            self.batch_shard.get_tp_group = lambda: self.group

    def __exit__(self, *exc_info):
        for module, name, value in self.saved:
            setattr(module, name, value)


class VllmSteps:
    """``model_runner.py``'s request bookkeeping and sampling around vLLM's samplers, on ``tp_size``
    ranks (with ``sharded``: vLLM's BatchSharder gives each rank the requests of its slots)."""

    def __init__(self, spec_tokens=0, max_num_reqs=4, max_model_len=48, seed=0, tp_size=1, sharded=False):
        from vllm.config import VllmConfig
        self.ranks = []
        for rank in range(tp_size):  # one process, one config per rank
            config = VllmConfig()
            config.parallel_config.enable_batch_sharded_sampling = sharded
            self.ranks.append(Rank(config, spec_tokens, max_num_reqs, max_model_len, rank, tp_size, sharded))
        self.states, self.sampler = self.ranks[0].states, self.ranks[0].sampler
        self.spec_tokens = spec_tokens
        self.random = random.Random(seed)
        self.requests = {}  # id -> dict(prompt, output, params)
        self.outputs = {}  # id -> output, of the requests that finished
        self.rows = {}  # (id, generated position) -> the logits row the sampler was given

    def step(self, add=(), finish=()):
        for request_id in finish:
            for rank in self.ranks:
                rank.states.remove_request(request_id)
            self.outputs[request_id] = self.requests.pop(request_id)["output"]
        for request_id, prompt, params in add:
            for rank in self.ranks:
                rank.states.add_request(request_id, len(prompt), list(prompt), 0, params.max_tokens)
                rank.sampler.add_request(rank.states.req_id_to_index[request_id], params)
            self.requests[request_id] = {"prompt": list(prompt), "output": [], "params": params}
        for rank in self.ranks:
            rank.states.apply_staged_writes()
            rank.sampler.apply_staged_writes()
        live = [r for r in self.requests if not self.done(r)]
        if live:
            self.forward(live)

    def done(self, request_id):
        request = self.requests[request_id]
        output = request["output"]
        return bool(output) and (output[-1] == EOS or len(output) >= request["params"].max_tokens)

    def forward(self, live):
        self.random.shuffle(live)  # a new batch order every step
        slots, rows_per_request, positions, input_ids, logits = [], [], [], [], []
        for request_id in live:
            request = self.requests[request_id]
            slot = self.states.req_id_to_index[request_id]
            tokens = request["prompt"] + request["output"]
            drafts = [] if not request["output"] else [self.random.randrange(VOCAB) if self.random.random() < 0.5
                                                      else None for _ in range(self.spec_tokens)]
            slots.append(slot)
            rows_per_request.append(1 + len(drafts))
            for j in range(1 + len(drafts)):
                position = len(tokens) - 1 + j
                row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(hash((request_id, position)) % 2**31))
                row[EOS] -= 6
                self.rows[(request_id, len(request["output"]) + j)] = row.clone()
                logits.append(row)
                positions.append(position)
                if j < len(drafts):  # the next row's input is this row's draft (the target's argmax half the time)
                    drafts[j] = drafts[j] if drafts[j] is not None else int(row.argmax())
            input_ids += [tokens[-1]] + drafts
        logits = torch.stack(logits)
        batch = self.batch(live, slots, rows_per_request, positions, input_ids)
        sampled, num_sampled = self.sample(logits, batch)
        from vllm.v1.worker.gpu.input_batch import post_update
        for rank in self.ranks:  # every rank commits the gathered tokens
            post_update(batch.idx_mapping, rank.states.num_computed_tokens.gpu, rank.states.last_sampled_tokens,
                        None, sampled, num_sampled, torch.zeros_like(num_sampled), None,
                        rank.states.all_token_ids.gpu, rank.states.total_len.gpu)
        for i, request_id in enumerate(live):
            for token in sampled[i, :int(num_sampled[i])].tolist():
                if not self.done(request_id):
                    self.requests[request_id]["output"].append(int(token))

    @staticmethod
    def batch(live, slots, rows_per_request, positions, input_ids):
        count = len(live)
        cu = np.zeros(count + 1, np.int32)
        np.cumsum(rows_per_request, out=cu[1:])
        expanded = np.repeat(np.array(slots, np.int64), rows_per_request)
        local = np.concatenate([np.arange(n) for n in rows_per_request]).astype(np.int32)
        seq_lens = [positions[cu[i + 1] - 1] + 1 for i in range(count)]
        return input_batch(
            req_ids=live, num_reqs=count, idx_mapping=torch.tensor(slots, dtype=torch.int32),
            idx_mapping_np=np.array(slots, np.int32), expanded_idx_mapping=torch.from_numpy(expanded).int(),
            expanded_local_pos=torch.from_numpy(local), input_ids=torch.tensor(input_ids, dtype=torch.int32),
            positions=torch.tensor(positions, dtype=torch.int64), logits_indices=torch.arange(len(positions)),
            cu_num_logits=torch.from_numpy(cu), cu_num_logits_np=cu, num_draft_tokens=int(cu[-1]) - count,
            num_draft_tokens_per_req=np.array(rows_per_request) - 1, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            seq_lens_cpu_upper_bound=torch.tensor(seq_lens), query_start_loc=torch.from_numpy(cu).int(),
            query_start_loc_np=cu)

    def sample(self, logits, batch):
        """Sampled tokens [requests, width] and counts, in batch order, from every rank's sampler."""
        width = 1 + self.spec_tokens
        sampled = torch.zeros((batch.num_reqs, width), dtype=torch.int64)
        num_sampled = torch.zeros(batch.num_reqs, dtype=torch.int32)
        if self.ranks[0].sharder is None:
            results = [rank.sample(logits.clone(), batch) for rank in self.ranks]
            for out in results[1:]:  # every rank samples every row, with the same early stops
                assert torch.equal(out.sampled_token_ids, results[0].sampled_token_ids)
            out = results[0]
            sampled[:, :out.sampled_token_ids.shape[1]] = out.sampled_token_ids
            return sampled, out.num_sampled.int()
        start = 0
        for rank in self.ranks:  # vLLM's BatchSharder: each rank's logits are its requests' rows
            local_batch, order, _, meta = rank.sharder.shard_sampler_inputs(batch, None)
            local_logits = logits[order][start:start + meta.num_local_logits]
            start += meta.num_local_logits
            owned = np.flatnonzero(batch.idx_mapping_np % rank.tp_size == rank.rank)
            assert list(local_batch.idx_mapping_np) == list(batch.idx_mapping_np[owned])
            if len(owned):
                out = rank.sample(local_logits, local_batch)
                sampled[owned, :out.sampled_token_ids.shape[1]] = out.sampled_token_ids
                num_sampled[owned] = out.num_sampled.int()
        return sampled, num_sampled

    def run(self, add, max_steps=60):
        pending = list(add)
        for _ in range(max_steps):
            finished = [r for r in self.requests if self.done(r)]
            if not pending and not any(not self.done(r) for r in self.requests):
                break
            room = self.states.max_num_reqs - len(self.requests) + len(finished)
            joining = pending[:max(room, 0)][:1]
            pending = pending[len(joining):]
            self.step(add=joining, finish=finished)
        self.step(finish=[r for r in self.requests if self.done(r)])
        self.step()


def check_stats(steps, collector, key, request_ids, outputs, temperature, topk):
    received = collector.take(key, [outputs[r] for r in request_ids], timeout=10)
    for request_id, (records, stopped) in zip(request_ids, received):
        tokens = outputs[request_id]
        stats = _trace_stats(records, stopped, bool(topk))
        rows = torch.stack([steps.rows[(request_id, p)] for p in range(len(tokens))])
        expected = fusedecode.logit_stats(rows, temperature=temperature, topk=topk, token_ids=torch.tensor(tokens),
                                          backend="torch")
        for name in STAT_FIELDS:
            if name == "topk_confidence" and not topk:
                continue
            np.testing.assert_allclose(getattr(stats, name).numpy(), getattr(expected, name).numpy(), rtol=1e-6,
                                       atol=1e-6, err_msg=name)


@needs_triton
@pytest.mark.parametrize("spec_tokens", [0, 2])
def test_vllm_samplers_drive_the_processor(cpu_buffers, spec_tokens):
    steps = VllmSteps(spec_tokens=spec_tokens, max_num_reqs=3)
    with fv.StatsCollector() as collector:
        key, = collector.open_keys(1)
        extra = {"fusedecode_topk": 4, **collector.extra_args(key)}
        shared = SamplingParams(temperature=0.8, seed=7, max_tokens=9, extra_args=extra)
        asking = [(f"a{i}", [3, 4, i], shared) for i in range(4)]  # one SamplingParams shared (n = 4)
        plain = ("plain", [5, 6], SamplingParams(temperature=0.0, max_tokens=7))  # greedy: nothing to process
        answers = []
        original = steps.sampler.add_request

        def recording_add(slot, params):
            original(slot, params)
            answers.append(bool(steps.sampler.needs_logits_processing[slot]))
        steps.sampler.add_request = recording_add
        steps.run([asking[0], plain] + asking[1:])
        outputs = steps.outputs
        assert answers[1] is False and all(answers[i] for i in (0, 2, 3, 4))  # the screened head runs for "plain" only
        ids = [request_id for request_id, _, _ in asking]
        assert all(len(outputs[r]) for r in ids)
        check_stats(steps, collector, key, ids, outputs, temperature=0.8, topk=4)


@needs_triton
def test_deepconf_stop_through_vllms_sampling_pipeline(cpu_buffers):
    """A threshold every window beats: the stop token must come out of vLLM's temperature, min-p and
    Gumbel sampling at the first full window. (vLLM's top-k/top-p Triton kernel does not run in
    Triton's interpreter, so it is left out here; it only ever removes tokens other than the top ones,
    and after the stop every other token is -inf.)"""
    steps = VllmSteps(max_num_reqs=2)
    extra = {"fusedecode_deepconf_window": 3, "fusedecode_deepconf_threshold": 1e9, "fusedecode_topk": 5}
    params = SamplingParams(temperature=1.3, min_p=0.01, seed=3, max_tokens=12, extra_args=extra)
    params.update_from_generation_config({}, EOS)  # what vLLM's input processor does with the tokenizer's EOS
    steps.run([("d", [1, 3], params)])
    outputs = steps.outputs
    assert outputs["d"][2] == EOS and len(outputs["d"]) == 3


@needs_triton
@pytest.mark.parametrize("sharded", [True, False])
def test_two_tensor_parallel_ranks_report_each_token_once(cpu_buffers, sharded):
    """With batch-sharded sampling vLLM's BatchSharder gives each rank the requests of its slots
    (slot % 2) and that rank reports them; without it both ranks sample every row and rank 0 reports."""
    steps = VllmSteps(max_num_reqs=4, tp_size=2, sharded=sharded)
    with fv.StatsCollector() as collector:
        key, = collector.open_keys(1)
        params = SamplingParams(temperature=0.9, seed=5, max_tokens=8,
                                extra_args={"fusedecode_topk": 3, **collector.extra_args(key)})
        requests = [(f"t{i}", [2, i], params) for i in range(4)]
        for request_id, prompt, p in requests:  # all four in the batch at once: slots 3, 2, 1, 0
            steps.step(add=[(request_id, prompt, p)])
        steps.run([])
        outputs = steps.outputs
        ids = [request_id for request_id, _, _ in requests]
        check_stats(steps, collector, key, ids, outputs, temperature=0.9, topk=3)
        assert collector.trace_count(key) == 4, "each completion reported by exactly one rank"
    reported = [rank.processors[0]._v2.counters["records"] for rank in steps.ranks]
    assert all(reported) if sharded else reported[1] == 0


def test_generate_checks_the_engine_before_submitting():
    """What each runner cannot deliver is refused with the fix named, before any request runs."""
    config = SimpleNamespace(use_v2_model_runner=False, scheduler_config=SimpleNamespace(async_scheduling=True),
                             speculative_config=None, model_config=SimpleNamespace(logits_processors=[PROCESSOR]))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))
    with pytest.raises(ValueError, match="async_scheduling=False"):
        fv.generate(llm, ["1+2="], SamplingParams(max_tokens=4))
    config.scheduler_config.async_scheduling, config.speculative_config = False, object()
    with pytest.raises(ValueError, match="speculative"):
        fv.check_engine(llm)
    config.use_v2_model_runner, config.scheduler_config.async_scheduling = True, True
    fv.check_engine(llm)  # Model Runner V2 records with both
    config.model_config.logits_processors = []
    with pytest.raises(ValueError, match="not loaded"):
        fv.check_engine(llm)
