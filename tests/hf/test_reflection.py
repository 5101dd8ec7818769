"""Reasoning steps and reflection insertion in Hugging Face ``generate`` on tiny random models:
``UncertaintyProcessor(delimiters=...)``'s online steps equal the offline grouping of its per-token
histories, and ``ReflectionInsertion`` inserts at exactly the positions the offline replay of its rule
names, in plain ``generate`` and inside ``srgen``; batches with padding, sampling and rows ending at
EOS."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.confidence import insertion_points, step_statistics  # noqa: E402
from fusedecode.hf import ReflectionInsertion, SRGenConfig, UncertaintyProcessor, srgen  # noqa: E402
from fusedecode.reflection import ReflectionConfig  # noqa: E402
from fusedecode.steps import cut_steps  # noqa: E402
from fusedecode.triggers import SRGenTrigger, StepTrigger  # noqa: E402
from hf_models import EOS, PAD, VOCAB, prompts, tiny_model  # noqa: E402

PHRASE = [90, 91, 92]  # the inserted tokens (the bias below rules them out otherwise)
FIELDS = ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "topk_confidence")


class Bias(transformers.LogitsProcessor):
    """Makes tokens 3-8 likely (so that delimiters, multi-token ones included, occur often), the
    phrase's impossible, and EOS likely enough that rows end at different steps when sampling;
    ``end_at`` {row: step} makes EOS the choice of a row at that generated step (for greedy decoding).
    A new object per generate call."""

    def __init__(self, eos_bias=2.0, end_at=None):
        self.bias = torch.zeros(VOCAB)
        self.bias[3:9] = 4.0
        self.bias[EOS] = eos_bias
        self.bias[PHRASE] = -30.0  # never drawn: where they appear, they were inserted
        self.end_at, self.prompt_length = end_at or {}, None

    def __call__(self, input_ids, scores):
        self.prompt_length = self.prompt_length or input_ids.shape[1]
        scores = scores + self.bias.to(scores.device)
        for row, step in self.end_at.items():
            if input_ids.shape[1] - self.prompt_length == step:
                scores[row, EOS] = 1e4
        return scores


def generate(model, inputs, processors, criteria=(), sampling=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(max_new_tokens=36, do_sample=sampling, pad_token_id=PAD, eos_token_id=EOS)
    if sampling:
        options.update(temperature=0.9, top_k=0)
    options.update(kwargs)
    return model.generate(**inputs, logits_processor=list(processors), stopping_criteria=list(criteria), **options)


def real_tokens(out, prompt_length, row):
    """The row's generated tokens up to and including its first EOS."""
    tokens = out[row, prompt_length:].tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def assert_same(got, want):
    for name in want._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), (name, a, b)
        assert torch.equal(a.isnan(), b.isnan()), name


@pytest.mark.parametrize("sampling", [True, False])
def test_online_steps_equal_offline_grouping(sampling):
    """Batch of 5 (two left-padded rows), rows ending at EOS at different steps, one-, two- and
    three-token delimiters matched across decode steps; the delimiters include the last token of a
    row that ran to the length limit (the last token's step end is known only from the output)."""
    model = tiny_model("llama")
    inputs = prompts(5, 6, padded_rows=2)
    inputs["input_ids"][:3, -1] = 5  # a prompt ending with a delimiter does not end a step
    inputs["input_ids"][3, -1] = 3   # nor does it start one: [3, 4] needs both tokens generated
    prompt_length = inputs["input_ids"].shape[1]
    ends = None if sampling else {1: 9, 3: 20}
    plain = generate(model, inputs, [Bias(end_at=ends), UncertaintyProcessor()], sampling=sampling)
    full_rows = [row for row in range(5) if EOS not in plain[row, prompt_length:].tolist()]
    assert full_rows and len(full_rows) < 5, "the rows should not all end, nor all run to the limit"
    last = plain[full_rows[0], -1].item()
    delimiters = [[5], [last], [3, 4], [6, 6, 6], [7, 4], [EOS]]
    processor = UncertaintyProcessor(temperature=0.9 if sampling else 1.0, topk=5, delimiters=delimiters)
    out = generate(model, inputs, [Bias(end_at=ends), processor], sampling=sampling)
    assert torch.equal(out, plain)  # recording steps changes nothing
    step_counts, multi_token_ends = set(), 0
    for field in FIELDS:
        online = processor.steps(field, out, EOS, tail=3)
        traces = processor.traces(field, out, EOS)
        for row in range(5):
            tokens = real_tokens(out, prompt_length, row)
            offline = step_statistics(traces[row], tokens, delimiters, tail=3)
            assert_same(online[row], offline)
            assert processor.step_index[row, :len(tokens)].tolist() == [
                step for step, (start, end) in enumerate(zip(offline.start.tolist(),
                                                             (offline.start + offline.count).tolist()))
                for _ in range(start, end)]
            step_counts.add(len(offline.count))
            ends = [tokens[:end] for end in (offline.start + offline.count)[offline.terminated].tolist()]
            multi_token_ends += sum(1 for prefix in ends if prefix[-1] not in (5, last, EOS))
    assert len(step_counts) > 1 and multi_token_ends > 0
    assert processor.steps("entropy", out, EOS)[full_rows[0]].terminated[-1]  # ends with `last`
    with pytest.raises(ValueError, match="sequences must be the"):
        processor.steps("entropy", out[:, :-1], EOS)


def test_steps_need_delimiters_in_the_vocabulary():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="steps need delimiters"):
        processor = UncertaintyProcessor()
        out = generate(model, prompts(2, 4), [processor], max_new_tokens=3)
        processor.steps("entropy", out)
    with pytest.raises(ValueError, match=r"delimiters hold token 96, outside the vocabulary \(96 tokens\)"):
        generate(model, prompts(2, 4), [UncertaintyProcessor(delimiters=[[3, VOCAB]])], max_new_tokens=3)
    with pytest.raises(ValueError, match="delimiters"):
        UncertaintyProcessor(delimiters=[[]])


def check_insertions(inserter, out, prompt_length, config, batch):
    """Every row's insertions equal the offline replay of the rule over its recorded histories and
    tokens, and the inserted tokens are in the output where recorded. Returns the insertion count."""
    processor, total = inserter.processor, 0
    histories = {field: processor.traces(field, out, EOS) for field in config.fields}
    for row in range(batch):
        tokens = real_tokens(out, prompt_length, row)
        replayed = insertion_points(tokens, {field: histories[field][row] for field in config.fields}, config)
        assert inserter.insertions[row] == replayed, (row, inserter.insertions[row], replayed)
        assert len(replayed) <= config.max_insertions
        for entry in replayed:
            emitted = tokens[entry.position:entry.position + len(config.tokens)]
            assert emitted == list(config.tokens)[:len(emitted)] and entry.inserted == len(emitted)
        # The phrase's first token appears only where an insertion was recorded: nothing was forced
        # unrecorded.
        starts = {entry.position for entry in replayed}
        assert all(t == PHRASE[0] and p in starts for p, t in enumerate(tokens) if t == PHRASE[0])
        total += len(replayed)
    return total


def step_threshold(model, inputs, delimiters):
    """The median step mean entropy of plain sampling: a threshold that fires at some step ends."""
    processor = UncertaintyProcessor(temperature=0.9, delimiters=delimiters)
    out = generate(model, inputs, [Bias(eos_bias=0.0), processor], seed=1)
    means = torch.cat([s.mean[s.terminated] for s in processor.steps("entropy", out, EOS)])
    return float(means.median())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_step_trigger_inserts_where_the_rule_says(kind):
    model = tiny_model(kind)
    inputs = prompts(5, 6, padded_rows=2)
    prompt_length = inputs["input_ids"].shape[1]
    delimiters = [[5], [3, 4]]
    threshold = step_threshold(model, inputs, delimiters)
    config = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=threshold), max_insertions=2,
                              delimiters=delimiters)
    total, rows_at_limit = 0, 0
    for seed in range(3):
        inserter = ReflectionInsertion(config, eos_token_id=EOS, temperature=0.9)
        out = generate(model, inputs, [Bias(eos_bias=0.0), inserter.processor], [inserter], seed=seed,
                       max_new_tokens=40)
        total += check_insertions(inserter, out, prompt_length, config, 5)
        rows_at_limit += sum(len(row) == 2 for row in inserter.insertions)
        for row in inserter.insertions:  # each insertion follows a step end whose mean was above
            assert all(entry.value > threshold and entry.trigger == 0 for entry in row)
    assert total >= 6 and rows_at_limit >= 1


def test_rows_that_ended_are_left_alone():
    """A trigger that fires at every clean step end, and the pad token as a delimiter: the padding
    after a row's EOS would end steps, but the row has ended and nothing is recorded there."""
    model = tiny_model("llama")
    inputs = prompts(3, 5)
    prompt_length = inputs["input_ids"].shape[1]
    config = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=-1e300), max_insertions=40,
                              delimiters=[[4], [5], [6], [7], [8], [PAD]])
    inserter = ReflectionInsertion(config, eos_token_id=EOS)
    out = generate(model, inputs, [Bias(end_at={0: 6, 1: 7, 2: 15}), inserter.processor], [inserter], sampling=False,
                   max_new_tokens=30)
    ended = [row for row in range(3) if out[row, -1] == PAD]
    assert ended and all((out[row, prompt_length:] == EOS).any() for row in ended)
    assert check_insertions(inserter, out, prompt_length, config, 3) >= 3


def test_srgen_trigger_and_several_triggers():
    model = tiny_model("llama")
    inputs = prompts(4, 5, padded_rows=1)
    prompt_length = inputs["input_ids"].shape[1]
    srgen_rule = SRGenTrigger(window=4, k=0.5, min_std=0.0, min_threshold=0.0, warmup_threshold=math.inf)
    for triggers in ([srgen_rule], [StepTrigger(threshold=1e3, measure="tail", tail=2, field="self_certainty",
                                                fires_when="below"), srgen_rule]):
        config = ReflectionConfig(tokens=PHRASE, triggers=triggers, max_insertions=3, delimiters=[[5]])
        inserter = ReflectionInsertion(config, eos_token_id=[EOS, 95], temperature=0.9)
        out = generate(model, inputs, [Bias(eos_bias=3.0), inserter.processor], [inserter], max_new_tokens=40)
        assert (out[:, prompt_length:-1] == EOS).any(), "some rows should end before the limit"
        assert check_insertions(inserter, out, prompt_length, config, 4) >= 4
        fired = {entry.trigger for row in inserter.insertions for entry in row}
        assert fired == set(range(len(triggers))), fired
        for row in inserter.insertions:  # SRGen's rule: never the first token
            assert all(entry.position >= 1 for entry in row)


def test_never_firing_insertion_changes_nothing():
    model = tiny_model("qwen2")
    inputs = prompts(3, 5)
    config = ReflectionConfig(tokens=PHRASE, triggers=[StepTrigger(threshold=1e30), SRGenTrigger(
        min_threshold=math.inf, warmup_threshold=math.inf)], max_insertions=2, delimiters=[[5]])
    inserter = ReflectionInsertion(config, eos_token_id=EOS, temperature=0.9, topk=4)
    watched = UncertaintyProcessor(temperature=0.9, topk=4)
    plain = generate(model, inputs, [Bias(), watched])
    out = generate(model, inputs, [Bias(), inserter.processor], [inserter])
    assert torch.equal(out, plain) and inserter.insertions == [[], [], []]
    assert torch.equal(inserter.processor.topk_confidence, watched.topk_confidence)


def test_pair_inside_srgen_matches_offline_replay():
    """srgen applies the pair at every step: the insertions equal the offline replay over what the
    processor recorded (SRGen's corrected distributions where it corrected), SRGen never corrects an
    inserted token, and with a trigger that never fires srgen + pair is plain generate + pair."""
    model = tiny_model("llama")
    inputs = prompts(4, 6, padded_rows=2)
    prompt_length = inputs["input_ids"].shape[1]
    config = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=step_threshold(model, inputs, [[5]])),
                              max_insertions=2, delimiters=[[5]])
    sensitive = SRGenConfig(window=4, k=0.5, min_std=0.0, min_threshold=0.0, warmup_threshold=math.inf, steps=1,
                            max_corrections=30)
    inserter = ReflectionInsertion(config, eos_token_id=EOS, temperature=0.9)
    out = generate(model, inputs, [Bias(eos_bias=0.0), inserter.processor], [inserter], custom_generate=srgen,
                   srgen_config=sensitive, return_dict_in_generate=True, max_new_tokens=40)
    assert check_insertions(inserter, out.sequences, prompt_length, config, 4) >= 2
    corrected = sum(map(len, out.corrections))
    assert corrected >= 10
    for row, corrections in enumerate(out.corrections):
        inserted = {entry.position + i for entry in inserter.insertions[row] for i in range(len(PHRASE))}
        assert not inserted & {step for step, _, _ in corrections}, row
    never = SRGenConfig(min_threshold=math.inf, warmup_threshold=math.inf)
    both = ReflectionInsertion(config, eos_token_id=EOS, temperature=0.9)
    with_srgen = generate(model, inputs, [Bias(eos_bias=0.0), both.processor], [both], custom_generate=srgen,
                          srgen_config=never, seed=3)
    plain = ReflectionInsertion(config, eos_token_id=EOS, temperature=0.9)
    without = generate(model, inputs, [Bias(eos_bias=0.0), plain.processor], [plain], seed=3)
    assert torch.equal(with_srgen, without) and both.insertions == plain.insertions


def test_refused_uses():
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    config = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=0.0), delimiters=[[5]])
    inserter = ReflectionInsertion(config, eos_token_id=EOS)
    with pytest.raises(ValueError, match="beam search"):
        generate(model, inputs, [inserter.processor], [inserter], sampling=False, num_beams=2)
    with pytest.raises(ValueError, match="stopping criteria did not see the last token"):
        generate(model, inputs, [inserter.processor], [], max_new_tokens=4)
    with pytest.raises(ValueError, match="without a logits processor call"):
        generate(model, inputs, [], [inserter], max_new_tokens=4)
    with pytest.raises(ValueError, match="assisted or speculative"):
        generate(model, {k: v[:1] for k, v in inputs.items()}, [inserter.processor], [inserter], sampling=False,
                 assistant_model=tiny_model("llama", seed=1), max_new_tokens=8)
    with pytest.raises(ValueError, match=r"tokens holds token 96, outside the vocabulary"):
        bad = ReflectionInsertion(ReflectionConfig(tokens=[VOCAB], triggers=StepTrigger(threshold=0.0),
                                                   delimiters=[[5]]), eos_token_id=EOS)
        generate(model, inputs, [bad.processor], [bad], max_new_tokens=3)
    # After a refused call the pair works again in a fresh one.
    out = generate(model, inputs, [Bias(), inserter.processor], [inserter], max_new_tokens=12)
    assert len(inserter.insertions) == 2 and out.shape[0] == 2


def test_pair_arguments():
    config = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=0.0, field="topk_confidence"),
                              delimiters=[[5]])
    with pytest.raises(ValueError, match="topk_confidence.*needs topk > 0"):
        ReflectionInsertion(config, eos_token_id=EOS)
    assert ReflectionInsertion(config, eos_token_id=EOS, topk=4).processor.topk == 4
    logprob = ReflectionConfig(tokens=PHRASE, triggers=StepTrigger(threshold=0.0, field="token_logprob"),
                               delimiters=[[5]])
    with pytest.raises(ValueError, match="token_logprob.*not known before the token is drawn"):
        ReflectionInsertion(logprob, eos_token_id=EOS)
    with pytest.raises(ValueError, match="tokens holds an eos_token_id"):
        ReflectionInsertion(ReflectionConfig(tokens=[4, EOS], triggers=SRGenTrigger()), eos_token_id=EOS)
    with pytest.raises(TypeError, match="config must be a fusedecode.reflection.ReflectionConfig"):
        ReflectionInsertion(StepTrigger(threshold=0.0), eos_token_id=EOS)
    with pytest.raises(ValueError, match="eos_token_id"):
        ReflectionInsertion(config, eos_token_id=[], topk=4)
    with pytest.raises(TypeError, match="eos_token_id"):
        ReflectionInsertion(config, eos_token_id=None, topk=4)
    with pytest.raises(ValueError, match="temperature"):
        ReflectionInsertion(config, eos_token_id=EOS, temperature=0.0, topk=4)
    assert ReflectionInsertion(config, eos_token_id=EOS, topk=4).insertions is None
    assert cut_steps([5], [[5]]).terminated.tolist() == [True]


def test_evaluation_script_runs(tmp_path):
    """benchmarks/eval_reasoning_steps.py end to end on a few problems (the table's numbers are its
    own; this checks that every variant runs and is written)."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "eval_reasoning_steps.py")
    subprocess.run([sys.executable, script, "--problems", "6", "--seeds", "1", "--batch", "3",
                    "--calibration-problems", "6", "--out", str(tmp_path)], check=True, capture_output=True)
    written = sorted(os.listdir(tmp_path))
    assert [name.rsplit(".", 1)[1] for name in written] == ["json", "md"]
    with open(tmp_path / written[0]) as handle:
        rows = json.load(handle)["results"]
    assert [row["variant"] for row in rows] == ["sampling", "srgen", "insert at step", "insert at token",
                                                "srgen + insert at step"]
    assert all(row["tokens_per_problem"] > 0 for row in rows)
