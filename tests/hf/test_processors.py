"""fusedecode.hf's logits processors (UncertaintyProcessor, ConfidenceStopping) and Best-of-N on tiny
random Llama- and Qwen2-style models."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import ConfidenceStopping, UncertaintyProcessor, best_of_n  # noqa: E402
from fusedecode.reference import logit_stats_reference  # noqa: E402
from hf_models import prompts, tiny_model  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("sampling", [False, True])
def test_generation_unchanged_and_entropies_match_output_scores(kind, sampling):
    model = tiny_model(kind)
    inputs = prompts(3, 6)
    kwargs = dict(max_new_tokens=12, do_sample=sampling, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True, top_k=0)
    if sampling:
        kwargs.update(temperature=0.8)  # output_scores then holds logits / 0.8
    torch.manual_seed(1)
    plain = model.generate(**inputs, **kwargs)
    processor = UncertaintyProcessor(temperature=0.8 if sampling else 1.0, topk=5)
    torch.manual_seed(1)
    watched = model.generate(**inputs, logits_processor=[processor], **kwargs)
    assert torch.equal(plain.sequences, watched.sequences)
    if sampling:  # with top-k/top-p too, the processor still sees the unwarped distribution
        torch.manual_seed(1)
        warped = model.generate(**inputs, logits_processor=[processor], **dict(kwargs, top_k=10, top_p=0.9))
        torch.manual_seed(1)
        assert torch.equal(warped.sequences, model.generate(**inputs, **dict(kwargs, top_k=10, top_p=0.9)).sequences)
        torch.manual_seed(1)
        watched = model.generate(**inputs, logits_processor=[processor], **kwargs)
    steps = len(watched.scores)
    assert processor.entropy.shape == (3, steps)
    for t, scores in enumerate(watched.scores):
        expected = logit_stats_reference(scores, topk=5, dtype=torch.float64)
        for field in ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "topk_confidence"):
            got = getattr(processor, field)[:, t].double()
            want = getattr(expected, field)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (field, t, got, want)


def test_num_return_sequences_and_fresh_history():
    model = tiny_model("llama")
    processor = UncertaintyProcessor()
    inputs = prompts(2, 5)
    out = model.generate(**inputs, max_new_tokens=7, do_sample=True, num_return_sequences=3, pad_token_id=0,
                         logits_processor=[processor])
    assert processor.entropy.shape == (6, out.shape[1] - 5)
    # A new call with the same batch size (6 rows) is recognised by its prompt length alone: the
    # history restarts, and equals what a fresh processor records.
    for length in (4, 5, 30):
        second = prompts(6, length, seed=length)
        model.generate(**second, max_new_tokens=4, do_sample=False, pad_token_id=0, logits_processor=[processor])
        fresh = UncertaintyProcessor()
        model.generate(**second, max_new_tokens=4, do_sample=False, pad_token_id=0, logits_processor=[fresh])
        assert processor.entropy.shape == (6, 4), length
        assert torch.equal(processor.entropy, fresh.entropy) and processor.prompt_length == length
    # Feeding an output plus exactly one token back in continues the history (the documented
    # limit): reset() is what starts a new one then.
    continued = model.generate(**prompts(6, 4, seed=4), max_new_tokens=4, do_sample=False, pad_token_id=0,
                               logits_processor=[processor])
    model.generate(input_ids=continued, max_new_tokens=2, do_sample=False, pad_token_id=0,
                   logits_processor=[processor])
    assert processor.entropy.shape == (6, 6)
    processor.reset()
    assert processor.num_steps == 0


def test_sequence_self_certainty_counts_only_real_tokens():
    processor = UncertaintyProcessor()
    prompt = torch.tensor([[5, 6], [5, 6]])
    scores = [torch.randn(2, 10) for _ in range(4)]
    ids = prompt
    for step, s in enumerate(scores):
        processor(ids, s)
        ids = torch.cat([ids, torch.tensor([[3], [4]])], dim=1)
    sequences = torch.tensor([[5, 6, 7, 2, 0, 0], [5, 6, 7, 8, 9, 7]])  # row 0 stops at EOS (2)
    got = processor.sequence_self_certainty(sequences, eos_token_id=2)
    certainty = torch.stack([logit_stats_reference(s).self_certainty for s in scores], dim=1)
    assert torch.allclose(got[0], certainty[0, :2].mean(), atol=1e-5)
    assert torch.allclose(got[1], certainty[1].mean(), atol=1e-5)


def test_confidence_stopping():
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    never = ConfidenceStopping(window=3, threshold=-1e9, topk=5, eos_token_id=2)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[never.processor], stopping_criteria=[never])
    assert out.shape[1] == 5 + 10 and not never.stopped.any()
    plain = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)
    always = ConfidenceStopping(window=3, threshold=1e9, topk=5, eos_token_id=2)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[always.processor], stopping_criteria=[always])
    # The window is full at the third token, which is EOS, as in the official processor.
    assert out.shape[1] == 5 + 3 and out[:, -1].tolist() == [2, 2] and always.stopped.all()
    assert torch.equal(out[:, :-1], plain[:, :7])
    assert always.processor.topk_confidence.shape == (2, 3)
    # An EOS other than the model's: the stopper's criterion stops the rows itself.
    other = ConfidenceStopping(window=2, threshold=1e9, topk=5, eos_token_id=7)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[other.processor], stopping_criteria=[other])
    assert out.shape[1] == 5 + 2 and out[:, -1].tolist() == [7, 7]
    # A row that ended with an EOS of the list is left alone: nothing is stopped after it ended.
    ended = ConfidenceStopping(window=4, threshold=[1e9, -1e9], topk=5, eos_token_id=[7, int(plain[0, 6])])
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[ended.processor], stopping_criteria=[ended], eos_token_id=int(plain[0, 6]))
    assert out[0, 5:7].tolist() == plain[0, 5:7].tolist() and ended.stopped.tolist() == [False, False]
    # One threshold per row: row 0 never stops, row 1 stops when its window fills.
    mixed = ConfidenceStopping(window=3, threshold=[-1e9, 1e9], topk=5, eos_token_id=2)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[mixed.processor], stopping_criteria=[mixed])
    assert mixed.stopped.tolist() == [False, True] and out[1, 5:].tolist() == plain[1, 5:7].tolist() + [2] + [0] * 7
    assert torch.equal(out[0], plain[0])
    # Thresholds from the recorded confidences, so that which steps form the window decides where
    # each row stops: between the lowest window mean before the chosen step and the mean at it.
    qwen, qwen_inputs = tiny_model("qwen2", seed=2), prompts(2, 5, seed=2)
    window, recorder, steps = 3, UncertaintyProcessor(topk=5), 12
    qwen_plain = qwen.generate(**qwen_inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                               logits_processor=[recorder])
    confidences = recorder.topk_confidence.double()
    means = confidences.unfold(1, window, 1).mean(-1)  # means[:, j]: steps j .. j + window - 1
    thresholds, stops = [], []
    for row in range(2):
        lows = [j for j in range(1, means.shape[1]) if means[row, j] < means[row, :j].min() - 1e-4]
        assert lows, "the confidences never fall to a new low: pick another model or prompt"
        thresholds.append(float(means[row, lows[-1]] + means[row, :lows[-1]].min()) / 2)
        stops.append(lows[-1] + window - 1)
    assert stops == [official_stop_step(confidences[row].tolist(), thresholds[row], window) for row in range(2)]
    assert min(stops) > window  # not the first full window: the window slid
    # A window of the wrong steps stops elsewhere: one that leaves out the current step one step
    # late, one step longer (or shorter) elsewhere on these rows.
    for other in (window - 1, window + 1):
        assert [official_stop_step(confidences[row].tolist(), thresholds[row], other) for row in range(2)] != stops
    tuned = ConfidenceStopping(window=window, threshold=thresholds, topk=5, eos_token_id=2)
    out = qwen.generate(**qwen_inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                        logits_processor=[tuned.processor], stopping_criteria=[tuned])
    assert tuned.stopped.tolist() == [True, True]
    for row, stop in enumerate(stops):
        new_tokens = out[row, 5:].tolist()
        assert new_tokens[:stop] == qwen_plain[row, 5:5 + stop].tolist() and new_tokens[stop] == 2
        assert all(token == 0 for token in new_tokens[stop + 1:])
    wrong = ConfidenceStopping(window=1, threshold=[1.0, 2.0, 3.0], topk=5, eos_token_id=2)
    with pytest.raises(ValueError, match="one per row"):
        model.generate(**inputs, max_new_tokens=2, pad_token_id=0, logits_processor=[wrong.processor],
                       stopping_criteria=[wrong])
    for bad in (math.nan, [1.0, math.inf], [[1.0]], "high"):
        with pytest.raises(ValueError, match="threshold"):
            ConfidenceStopping(window=2, threshold=bad, eos_token_id=2)
    with pytest.raises(ValueError, match="window"):
        ConfidenceStopping(window=0, threshold=1.0, eos_token_id=2)
    for bad in (None, -1, [], [2, "x"], True):
        with pytest.raises(ValueError, match="eos_token_id"):
            ConfidenceStopping(window=2, threshold=1.0, eos_token_id=bad)
    outside = ConfidenceStopping(window=1, threshold=1.0, eos_token_id=[2, 500])
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(**inputs, max_new_tokens=2, pad_token_id=0, logits_processor=[outside.processor],
                       stopping_criteria=[outside])
    with pytest.raises(TypeError):
        ConfidenceStopping(window=2, threshold=1.0)  # eos_token_id is required
    with pytest.raises(ValueError, match="topk"):
        ConfidenceStopping(window=2, threshold=1.0, topk=0, eos_token_id=2)


def official_stop_step(confidences, threshold, group_size):
    """The step at which the authors' vLLM processor stops a trace, or None: deepconf/processors.py
    ConfPerReqLogitsProcessor.__call__ (facebookresearch/deepconf), transcribed. Each step appends its
    confidence to a deque of ``group_size`` (dropping the oldest from the running sum when full); once
    full, a mean below ``threshold`` leaves only EOS possible at that step."""
    window, running = [], 0.0
    for step, conf in enumerate(confidences):
        if len(window) == group_size:
            running -= window.pop(0)
        window.append(conf)
        running += conf
        if len(window) >= group_size and running / len(window) < threshold:
            return step
    return None


def test_confidence_stopping_waits_while_eos_is_masked():
    # min_new_tokens masks EOS (a processor that runs before the stopper): a row whose window is
    # below the threshold is not stopped while it cannot emit EOS, and stops with EOS at the first
    # step where it can.
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    stopper = ConfidenceStopping(window=3, threshold=1e9, topk=5, eos_token_id=2)
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=2, logits_processor=[stopper.processor], stopping_criteria=[stopper])
    plain = model.generate(**inputs, max_new_tokens=12, min_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=2)
    assert stopper.stopped.tolist() == [True, True]
    assert out.shape[1] == 5 + 7 and out[:, -1].tolist() == [2, 2]
    assert torch.equal(out[:, :-1], plain[:, :11])


@pytest.mark.parametrize("sampling", [False, True])
def test_confidence_stopping_matches_official_processor(sampling):
    """Rows stop exactly where the official processor would on the same confidences, the token of
    that step is EOS, and every token before it is what generation without the stop gives."""
    model = tiny_model("qwen2", seed=2)
    inputs = prompts(8, 5, seed=2)
    kwargs = dict(max_new_tokens=24, do_sample=sampling, pad_token_id=0, eos_token_id=2)
    if sampling:
        kwargs.update(top_k=0, temperature=1.0)
    recorder = UncertaintyProcessor(topk=20)
    torch.manual_seed(3)
    free = model.generate(**inputs, logits_processor=[recorder], **kwargs)
    real = recorder.traces("topk_confidence", free, eos_token_id=2)  # up to and including a natural EOS
    window = 4
    lowest = [float(t.unfold(0, window, 1).mean(-1).min()) if len(t) >= window else math.inf for t in real]
    threshold = float(torch.tensor(lowest).median())  # about half the rows stop
    stopper = ConfidenceStopping(window=window, threshold=threshold, topk=20, eos_token_id=2)
    torch.manual_seed(3)
    stopped = model.generate(**inputs, logits_processor=[stopper.processor], stopping_criteria=[stopper], **kwargs)
    expected = [official_stop_step(trace.tolist(), threshold, window) for trace in real]
    assert any(step is not None for step in expected) and any(step is None for step in expected)
    for row, step in enumerate(expected):
        new = stopped[row, 5:].tolist()
        assert bool(stopper.stopped[row]) == (step is not None), (row, step)
        if step is None:
            assert new == free[row, 5:5 + len(new)].tolist()
            continue
        assert new[:step] == free[row, 5:5 + step].tolist()
        assert new[step] == 2 and all(token == 0 for token in new[step + 1:])


def test_best_of_n_borda():
    """fusedecode.hf.best_of_n is fusedecode.confidence.best_of_n (tested against the official code in
    test_confidence.py)."""
    from fusedecode import confidence

    assert best_of_n is confidence.best_of_n
    certainties = [3.0, 2.0, 1.0, 0.5]
    answers = ["a", "b", "b", "c"]
    winner, totals = best_of_n(certainties, answers, power=1.0)
    assert winner == "b" and totals == {"a": 4.0, "b": 5.0, "c": 1.0}
    assert best_of_n(certainties, ["x", "y", None, "y"], power=0)[0] == "y"
    with pytest.raises(ValueError):
        UncertaintyProcessor(temperature=0)


def test_deepconf_calibration_from_recorded_traces():
    """Warm-up traces recorded by the processor give the threshold the official calibration gives on
    the same real-token confidences (numpy's percentile of the lowest sliding-window means)."""
    import numpy as np

    from fusedecode.confidence import confidence_threshold, lowest_group_confidence

    model = tiny_model("llama", seed=4)
    inputs = prompts(4, 5, seed=4)
    recorder = UncertaintyProcessor(topk=20)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=2,
                         num_return_sequences=4, logits_processor=[recorder])
    traces = recorder.traces("topk_confidence", out, eos_token_id=2)
    assert len(traces) == 16 and all(t.dtype == torch.float32 and t.dim() == 1 for t in traces)
    mask = recorder.token_mask(out, 2)
    for row, trace in enumerate(traces):
        assert torch.equal(trace, recorder.topk_confidence[row][mask[row]])
    lowest = [lowest_group_confidence(trace, 4) for trace in traces]
    official = [min(sum(t[i:i + 4]) / 4 for i in range(len(t) - 3)) if len(t) >= 4 else sum(t) / len(t)
                for t in (trace.tolist() for trace in traces)]
    assert lowest == pytest.approx(official, rel=1e-12)
    assert confidence_threshold(lowest, keep_percent=10) == pytest.approx(float(np.percentile(official, 90)))
