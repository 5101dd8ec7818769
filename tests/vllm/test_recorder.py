"""fusedecode.vllm's worker-side bookkeeping without vLLM: simulated batches (preemption, slot reuse
without a removed entry, one-way moves and swaps, finish and abort, mixed rows) checked record by
record against fusedecode.logit_stats, and the request options. Runs in `make test`."""

import gc
import math

import numpy as np
import pytest
import torch

import fusedecode
from fusedecode.vllm._options import parse_options
from fusedecode.vllm._runner_v1 import V1Recorder

VOCAB, EOS = 11, 2


class Params:
    """The SamplingParams fields the recorder reads (weak-referenceable, like vLLM's)."""

    def __init__(self, temperature=1.0, **extra):
        self.temperature, self.extra_args = temperature, dict(extra)
        self.eos_token_id, self.stop_token_ids, self.ignore_eos = EOS, [], False


class Sender:
    sent = []

    def __init__(self, path, authkey):
        self.path = path

    def send(self, header, records):
        Sender.sent.append((header, records.copy()))

    def close(self):
        pass


def channel(key):
    return {"fusedecode_key": key, "fusedecode_channel": "/tmp/fusedecode-vllm-test/stats.sock",
            "fusedecode_authkey": "ab" * 32}


class Batch:
    """A model runner in miniature: rows by batch index, logits a fixed function of (request, position),
    greedy sampling of what the processors leave (so an early stop shows in the tokens)."""

    def __init__(self):
        Sender.sent = []
        self.recorder = V1Recorder("cpu", sender_factory=Sender)
        self.rows = {}  # index -> (name, params, output)
        self.logits_of = {}  # (name, position) -> the row the model produced

    def row(self, name, position):
        if (name, position) not in self.logits_of:
            seed = sum(map(ord, name)) * 1000 + position
            row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
            row[EOS] -= 20  # never sampled unless an early stop forces it
            self.logits_of[(name, position)] = row
        return self.logits_of[(name, position)]

    def step(self, removed=(), added=(), moved=(), mask_eos=()):
        """One engine step: ``added`` holds (index, name, params, output) entries."""
        self.recorder.resolve()
        self.recorder.update_batch(list(removed), [(i, p, o) for i, _n, p, o in added], list(moved))
        self.recorder.flush()
        for index in removed:
            self.rows.pop(index)
        for index, name, params, output in added:
            self.rows[index] = (name, params, output)
        for source, target, is_swap in moved:
            moving = self.rows.pop(source)
            if is_swap:
                self.rows[source] = self.rows.pop(target)
            self.rows[target] = moving
        order = sorted(self.rows)
        assert order == list(range(len(order))), "vLLM keeps the batch dense"
        if not order:
            return None
        logits = torch.stack([self.row(self.rows[i][0], len(self.rows[i][2])) for i in order])
        for j, index in enumerate(order):
            if self.rows[index][0] in mask_eos:
                logits[j, EOS] = -math.inf
        seen = logits.clone()
        self.recorder.record(logits)
        for j, index in enumerate(order):
            self.rows[index][2].append(int(logits[j].argmax()))
        return seen

    def records(self):
        """uid -> records sorted by position, and the header entries."""
        by_uid, new, stopped = {}, {}, {}
        for header, records in Sender.sent:
            new.update(header["new"])
            stopped.update(header["stopped"])
            for uid in np.unique(records["uid"]):
                by_uid.setdefault(int(uid), []).append(records[records["uid"] == uid])
        return {uid: np.sort(np.concatenate(chunks), order="position") for uid, chunks in by_uid.items()}, new, stopped


def check_trace(batch, records, name, output, temperature=1.0, topk=0):
    """Records for positions 0..len(output)-1 of this request, each equal to logit_stats of its row."""
    assert list(records["position"]) == list(range(len(output)))
    assert list(records["token"]) == output
    rows = torch.stack([batch.row(name, p) for p in range(len(output))])
    expected = fusedecode.logit_stats(rows, temperature=temperature, topk=topk,
                                      token_ids=torch.tensor(output), backend="torch")
    for field in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "token_logprob"):
        np.testing.assert_allclose(records[field], getattr(expected, field).numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=field)
    if topk:
        np.testing.assert_allclose(records["topk_confidence"], expected.topk_confidence.numpy(), rtol=1e-5, atol=1e-5)


def test_preemption_slot_reuse_moves_and_finish():
    batch = Batch()
    params = {name: Params(fusedecode_topk=3, **channel(name)) for name in "ABCD"}
    outputs = {name: [] for name in "ABCD"}
    plain = Params()  # a request without options in the same batch
    batch.step(added=[(0, "A", params["A"], outputs["A"]), (1, "P", plain, []), (2, "B", params["B"], outputs["B"])])
    batch.step()
    batch.step()
    # A preempted; C reuses index 0 with no removed entry (what vLLM does when it reuses a freed slot)
    batch.step(added=[(0, "C", params["C"], outputs["C"])])
    batch.step(moved=[(0, 2, True)])  # swap C and B
    # B (now at 0) finishes: vLLM drops its params; the last row moves into the hole (one-way)
    del params["B"]
    gc.collect()
    batch.step(removed=[0], moved=[(2, 0, False)])
    batch.step(added=[(2, "A", params["A"], outputs["A"])])  # A resumes with its tokens so far
    batch.step(added=[(3, "D", params["D"], outputs["D"])])
    batch.step()
    batch.step(removed=[3, 2, 1, 0])  # resolves the last step
    by_uid, new, _ = batch.records()
    assert sorted(new.values()) == ["A", "B", "C", "D"], "one trace per request: A's resume is no new trace"
    for uid, key in new.items():
        check_trace(batch, by_uid[int(uid)], key, outputs[key], topk=3)
    assert batch.recorder.counters["resumed"] == 1
    recorder = batch.recorder
    params.clear()
    gc.collect()
    batch.step(added=[(0, "E", Params(), [])])
    assert not len(recorder.book) and not recorder._rows and not recorder.book.by_table, "finished traces are forgotten"


def test_abort_while_preempted_is_forgotten():
    batch = Batch()
    first, second = Params(**channel("X")), Params(**channel("Y"))
    out_x, out_y = [], []
    batch.step(added=[(0, "X", first, out_x), (1, "Y", second, out_y)])
    batch.step(removed=[0], moved=[(1, 0, False)])  # X preempted
    assert len(batch.recorder.book) == 1
    del first  # aborted while preempted: vLLM drops it without a batch entry
    gc.collect()
    batch.step(added=[(1, "Z", Params(**channel("Z")), [])])
    assert not len(batch.recorder.book)
    batch.step(removed=[1, 0])
    by_uid, new, _ = batch.records()
    check_trace(batch, by_uid[int(next(u for u, k in new.items() if k == "Y"))], "Y", out_y)
    x_records = by_uid[int(next(u for u, k in new.items() if k == "X"))]
    assert list(x_records["token"]) == out_x  # the partial trace, under its own key


def test_per_row_temperatures_in_one_group():
    batch = Batch()
    hot, cold = Params(temperature=1.3, **channel("H")), Params(temperature=0.0, **channel("G"))
    out_hot, out_cold = [], []
    batch.step(added=[(0, "H", hot, out_hot), (1, "G", cold, out_cold)])
    for _ in range(4):
        batch.step()
    batch.step(removed=[1, 0])
    by_uid, new, _ = batch.records()
    uid = {key: int(u) for u, key in new.items()}
    check_trace(batch, by_uid[uid["H"]], "H", out_hot, temperature=1.3)
    check_trace(batch, by_uid[uid["G"]], "G", out_cold, temperature=1.0)  # greedy: measured at 1


def test_deepconf_stop_forces_eos_and_waits_for_masked_eos():
    window = 3
    batch = Batch()
    # Free run first: the window means of the greedy trace set the threshold.
    free_out = []
    batch.step(added=[(0, "S", Params(fusedecode_topk=4, **channel("free")), free_out)])
    for _ in range(8):
        batch.step()
    batch.step(removed=[0])
    by_uid, _, _ = batch.records()
    confidence = by_uid[min(by_uid)]["topk_confidence"].astype(np.float64)
    means = np.convolve(confidence, np.ones(window) / window, "valid")  # mean ending at position p + window - 1
    threshold = float(np.sort(means)[len(means) // 2]) + 1e-4
    first = window - 1 + int(np.flatnonzero(means < threshold)[0])
    for masked_until in (0, first + 2):
        batch = Batch()
        output = []
        extra = dict(fusedecode_topk=4, fusedecode_deepconf_window=window, fusedecode_deepconf_threshold=threshold)
        batch.step(added=[(0, "S", Params(**extra, **channel("stop")), output)], mask_eos=("S",) * (masked_until > 0))
        while len(output) < 9 and (not output or output[-1] != EOS or len(output) <= masked_until):
            batch.step(mask_eos=("S",) if len(output) < masked_until else ())
        batch.step(removed=[0])
        _, _, stopped = batch.records()
        expected = first if not masked_until else next(
            p for p in range(masked_until, 9) if confidence[p - window + 1:p + 1].mean() < threshold)
        assert output[:expected] == free_out[:expected]
        assert output[expected] == EOS and list(stopped.values()) == [expected]


@pytest.mark.parametrize("extra, match", [
    ({"fusedecode_topk": 65}, "fusedecode_topk"),
    ({"fusedecode_topk": True}, "fusedecode_topk"),
    ({"fusedecode_temperature": 0.0}, "fusedecode_temperature"),
    ({"fusedecode_temperature": float("nan")}, "fusedecode_temperature"),
    ({"fusedecode_deepconf_window": 4}, "fusedecode_deepconf_threshold"),
    ({"fusedecode_deepconf_window": 0, "fusedecode_deepconf_threshold": 1.0}, "fusedecode_deepconf_window"),
    ({"fusedecode_deepconf_window": 4, "fusedecode_deepconf_threshold": float("inf")}, "fusedecode_deepconf_threshold"),
    ({"fusedecode_tokp": 3}, "unknown fusedecode option"),
    ({"fusedecode_key": "k"}, "go together"),
    ({**channel("k"), "fusedecode_channel": "relative/stats.sock"}, "absolute path"),
    ({**channel("k"), "fusedecode_authkey": "00"}, "fusedecode_authkey"),
    ({"fusedecode_reflection": "{"}, "fusedecode_reflection is not valid JSON"),
    ({"fusedecode_reflection": "[15]"}, "fusedecode_reflection must be a JSON object"),
    ({"fusedecode_reflection": '{"tokens": [15]}'}, "fusedecode_reflection needs 'tokens' and 'triggers'"),
    ({"fusedecode_reflection": '{"tokens": [15], "triggers": [], "extra": 1}'}, "fusedecode_reflection needs"),
    ({"fusedecode_reflection": '{"tokens": [15], "triggers": [{"type": "magic"}]}'}, "'type' must be one of"),
    ({"fusedecode_reflection": '{"tokens": [15], "triggers": [{"type": "srgen", "window": 1}]}'}, "window"),
    ({"fusedecode_reflection": '{"tokens": [], "triggers": [{"type": "srgen"}]}'}, "tokens is empty"),
    ({"fusedecode_reflection": '{"tokens": [-1], "triggers": [{"type": "srgen"}]}'}, "tokens must be >= 0"),
    ({"fusedecode_reflection": '{"tokens": [1], "triggers": [{"type": "srgen"}], "max_insertions": -1}'},
     "max_insertions"),
    ({"fusedecode_reflection": '{"tokens": [1], "triggers": [{"type": "step", "threshold": 1.0}]}'},
     "delimiters must be given"),
    ({"fusedecode_reflection": '{"tokens": [1], "delimiters": [[3]], "triggers": [{"type": "step", '
                               '"threshold": NaN}]}'}, "threshold"),
    ({"fusedecode_reflection": '{"tokens": [1], "delimiters": [[3]], "triggers": [{"type": "step", '
                               '"threshold": 1.0, "field": "token_logprob"}]}'}, "not known before the token"),
    ({"fusedecode_reflection": '{"tokens": [1], "delimiters": [[3]], "triggers": [{"type": "step", '
                               '"threshold": 1.0, "field": "topk_confidence"}]}'}, "fusedecode_topk >= 1"),
])
def test_invalid_options_name_the_option(extra, match):
    with pytest.raises(ValueError, match=match):
        parse_options(extra)


def test_reflection_option_round_trip_and_v1_refusal():
    from fusedecode.reflection import ReflectionConfig
    from fusedecode.triggers import SRGenTrigger, StepTrigger
    from fusedecode.vllm._options import parse_reflection, reflection_extra
    config = ReflectionConfig([11, 12], [SRGenTrigger(window=3), StepTrigger(0.5, field="topk_confidence",
                                                                               measure="tail", tail=2)],
                              max_insertions=3, delimiters=[3, [7, 8]])
    assert parse_reflection(reflection_extra(config)) == config
    options = parse_options({"fusedecode_reflection": reflection_extra(config), "fusedecode_topk": 4})
    assert options.reflection == config and options.topk == 4
    # The V1 runner cannot force in time: the request runs without insertion and its caller is told.
    batch, output = Batch(), []
    batch.step(added=[(0, "R", Params(fusedecode_reflection=reflection_extra(config), fusedecode_topk=4,
                                      **channel("r")), output)])
    batch.step()
    headers = [header for header, _ in Sender.sent]
    assert any("Model Runner V2" in header["errors"].get("r", "") for header in headers)
    assert 11 not in output or batch.row("R", output.index(11)).argmax() == 11


def test_options_defaults():
    assert parse_options({"other": 1}) is None
    assert parse_options({"fusedecode_topk": 5}, sampling_temperature=0.0).temperature == 1.0
    assert parse_options({"fusedecode_topk": 5}, sampling_temperature=0.7).temperature == 0.7
    stop = parse_options({"fusedecode_deepconf_window": 8, "fusedecode_deepconf_threshold": 3.0})
    assert stop.topk == 20 and stop.stops_early and not stop.reports
    with pytest.raises(ValueError, match="ignore_eos"):
        parse_options({"fusedecode_deepconf_window": 8, "fusedecode_deepconf_threshold": 3.0}, ignore_eos=True)
    assert parse_options({"fusedecode_deepconf_window": 8, "fusedecode_deepconf_threshold": 3.0}, ignore_eos=True,
                         stop_token_ids=(5,)).window == 8


def test_a_discarded_partial_prefill_step_leaves_no_record_and_is_measured_again():
    batch = Batch()
    params, output = Params(fusedecode_topk=2, **channel("P")), []
    batch.recorder.update_batch([], [(0, params, output)], [])
    for _ in range(2):  # two prefill chunks: vLLM runs the processor, then drops the sampled token
        batch.recorder.record(torch.stack([torch.randn(VOCAB)]))
        batch.recorder.resolve()
        batch.recorder.flush()
    batch.rows[0] = ("P", params, output)
    for _ in range(4):
        batch.step()
    batch.step(removed=[0])
    by_uid, new, _ = batch.records()
    check_trace(batch, by_uid[int(next(iter(new)))], "P", output, topk=2)


def test_completions_sharing_one_params_and_a_shared_temperature():
    batch = Batch()
    shared = Params(temperature=0.7, fusedecode_topk=3, **channel("N"))  # n = 3: one params object
    outputs = [[], [], []]
    batch.step(added=[(i, "N", shared, outputs[i]) for i in range(3)])
    for _ in range(4):
        batch.step()
    batch.step(removed=[2, 1, 0])
    by_uid, new, _ = batch.records()
    assert len(new) == 3 and set(new.values()) == {"N"}
    for uid, output in zip(sorted(int(u) for u in new), outputs):
        check_trace(batch, by_uid[uid], "N", output, temperature=0.7, topk=3)


def test_ignore_eos_with_stop_token_ids_forces_the_stop_token():
    batch = Batch()
    params = Params(fusedecode_topk=2, fusedecode_deepconf_window=2, fusedecode_deepconf_threshold=1e9,
                    **channel("I"))
    params.eos_token_id, params.ignore_eos, params.stop_token_ids = None, True, [7]
    output = []
    batch.step(added=[(0, "I", params, output)])
    batch.step()
    batch.step(removed=[0])
    assert output[1] == 7
    _, _, stopped = batch.records()
    assert list(stopped.values()) == [1]
