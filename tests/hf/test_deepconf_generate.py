"""fusedecode.hf.deepconf_generate: DeepConf in one generate call with the Hub DeepConf options. Its
tokens are those of plain generate (DeepConf off, or tracking only) and of ConfidenceStopping passed by
hand (online stop); its calibration is fusedecode.confidence's on the recorded warm-up traces."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.confidence import confidence_threshold, lowest_group_confidence  # noqa: E402
from fusedecode.hf import ConfidenceStopping, UncertaintyProcessor, deepconf_generate  # noqa: E402
from hf_models import EOS, prompts, tiny_model  # noqa: E402

COMMON = dict(max_new_tokens=16, pad_token_id=0, eos_token_id=EOS)


def seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


# Tiny models: one thread (tests/hf/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=2)


def test_off_and_tracking_only_are_plain_generate(model):
    inputs = prompts(3, 5, seed=2)
    kwargs = dict(inputs, do_sample=True, **COMMON)
    # A token row 1 draws early acts as EOS, so that rows end at different steps.
    eos = int(seeded(1, model.generate, **kwargs)[1, 5 + 4])
    kwargs["eos_token_id"] = eos
    plain = seeded(1, model.generate, **kwargs)
    assert torch.equal(seeded(1, deepconf_generate, model, **kwargs), plain)
    tracked = seeded(1, deepconf_generate, model, enable_conf=True, enable_early_stopping=False, window_size=3,
                     conf_topk=5, output_confidences=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(tracked.sequences, plain)
    assert tracked.stopped is None and tracked.threshold is None
    # The confidences are UncertaintyProcessor's topk_confidence on the real tokens, NaN after EOS.
    recorder = UncertaintyProcessor(topk=5)
    seeded(1, model.generate, logits_processor=[recorder], **kwargs)
    mask = recorder.token_mask(plain, eos)
    assert not mask.all()  # some row ended early: the NaN padding is exercised
    expected = torch.where(mask, recorder.topk_confidence, torch.full((), math.nan))
    assert torch.equal(tracked.confidences.isnan(), expected.isnan())
    assert torch.equal(tracked.confidences.nan_to_num(), expected.nan_to_num())
    lowest = [lowest_group_confidence(trace, 3) for trace in recorder.traces("topk_confidence", plain, eos)]
    assert tracked.lowest_group_confidences.tolist() == lowest


def test_online_stop_is_confidence_stopping(model):
    inputs = prompts(8, 5, seed=2)
    kwargs = dict(inputs, do_sample=True, **COMMON)
    free = seeded(3, deepconf_generate, model, enable_conf=True, enable_early_stopping=False, window_size=4,
                  return_dict_in_generate=True, **kwargs)
    threshold = float(free.lowest_group_confidences.median())  # about half the rows stop
    out = seeded(3, deepconf_generate, model, enable_conf=True, window_size=4, threshold=threshold,
                 return_dict_in_generate=True, **kwargs)
    stopper = ConfidenceStopping(window=4, threshold=threshold, topk=20, eos_token_id=EOS)
    by_hand = seeded(3, model.generate, logits_processor=[stopper.processor], stopping_criteria=[stopper], **kwargs)
    assert torch.equal(out.sequences, by_hand)
    assert out.stopped.tolist() == stopper.stopped.tolist() and 0 < sum(out.stopped.tolist()) < 8
    assert out.threshold.tolist() == [threshold] * 8
    # Stopped rows are below the threshold by their lowest group confidence, the others at or above it.
    for stopped, lowest in zip(out.stopped.tolist(), out.lowest_group_confidences.tolist()):
        assert (lowest < threshold) == stopped
    # The caller's own processors and criteria still run, before the stop's processor.
    banned = transformers.NoBadWordsLogitsProcessor([[7]], eos_token_id=EOS)
    out = seeded(3, deepconf_generate, model, enable_conf=True, window_size=4, threshold=threshold,
                 logits_processor=[banned], **kwargs)
    stopper = ConfidenceStopping(window=4, threshold=threshold, topk=20, eos_token_id=EOS)
    by_hand = seeded(3, model.generate, logits_processor=[banned, stopper.processor], stopping_criteria=[stopper],
                     **kwargs)
    assert torch.equal(out, by_hand) and not (out[:, 5:] == 7).any()


def test_calibration_from_given_warmup_confidences(model):
    inputs = prompts(4, 5, seed=4)
    kwargs = dict(inputs, do_sample=True, return_dict_in_generate=True, **COMMON)
    warm = [3.9, 4.1, 4.0, 4.2, 4.05]
    for variant, keep in (("low", 10), ("high", 90)):
        out = seeded(5, deepconf_generate, model, enable_conf=True, window_size=3, deepconf_variant=variant,
                     deepconf_warmup_confidences=warm, **kwargs)
        assert out.threshold.tolist() == [confidence_threshold(warm, keep_percent=keep)] * 4
    out = seeded(5, deepconf_generate, model, enable_conf=True, window_size=3, deepconf_variant="low",
                 deepconf_eta=0.5, deepconf_warmup_confidences=torch.tensor(warm, dtype=torch.float64), **kwargs)
    assert out.threshold.tolist() == [confidence_threshold(warm, keep_percent=50)] * 4


def test_warmup_traces_calibrate_each_prompt(model):
    """The warm-up traces of each prompt (prompt-major rows) give that prompt's threshold, repeated for
    its num_return_sequences rows; the final traces are then ConfidenceStopping with those thresholds."""
    inputs = prompts(2, 5, seed=6, padded_rows=0)
    kwargs = dict(inputs, do_sample=True, **COMMON)
    out = seeded(7, deepconf_generate, model, enable_conf=True, window_size=3, deepconf_variant="high",
                 deepconf_warmup_traces=5, num_return_sequences=3, return_dict_in_generate=True, **kwargs)
    # The same steps by hand: warm-up with a recorder, percentile per prompt, then the stop.
    torch.manual_seed(7)
    recorder = UncertaintyProcessor(topk=20)
    warm = model.generate(logits_processor=[recorder], num_return_sequences=5, **kwargs)
    lowest = [lowest_group_confidence(trace, 3) for trace in recorder.traces("topk_confidence", warm, EOS)]
    per_prompt = [confidence_threshold(lowest[:5], keep_percent=90), confidence_threshold(lowest[5:], keep_percent=90)]
    assert per_prompt[0] != per_prompt[1]  # the prompts differ: a mixed-up grouping would show
    thresholds = [per_prompt[0]] * 3 + [per_prompt[1]] * 3
    stopper = ConfidenceStopping(window=3, threshold=thresholds, topk=20, eos_token_id=EOS)
    final = model.generate(logits_processor=[stopper.processor], stopping_criteria=[stopper], num_return_sequences=3,
                           **kwargs)
    assert torch.equal(out.warmup_sequences, warm)
    assert out.warmup_lowest_group_confidences.tolist() == lowest
    assert out.threshold.tolist() == thresholds
    assert torch.equal(out.sequences, final)
    assert out.stopped.tolist() == stopper.stopped.tolist()


@pytest.mark.parametrize("options, error, match", [
    (dict(enable_conf=1), TypeError, "enable_conf"),
    (dict(enable_conf=True, enable_early_stopping="yes"), TypeError, "enable_early_stopping"),
    (dict(output_confidences=None), TypeError, "output_confidences"),
    (dict(enable_conf=True, threshold=1.0, window_size=0), ValueError, "window_size"),
    (dict(enable_conf=True, threshold=1.0, conf_topk=0), ValueError, "conf_topk"),
    (dict(enable_conf=True, threshold=1.0, conf_topk=65), ValueError, "conf_topk"),
    (dict(enable_conf=True), ValueError, "needs a threshold"),
    (dict(enable_conf=True, threshold=math.nan), ValueError, "threshold"),
    (dict(enable_conf=True, threshold=[1.0, math.inf]), ValueError, "threshold"),
    (dict(threshold=1.0), ValueError, "threshold"),  # the stop is off: it would be ignored
    (dict(enable_conf=True, enable_early_stopping=False, deepconf_variant="low"), ValueError, "deepconf_variant"),
    (dict(enable_conf=True, threshold=1.0, deepconf_warmup_confidences=[1.0]), ValueError, "one way"),
    (dict(enable_conf=True, deepconf_warmup_confidences=[1.0, 2.0]), ValueError, "deepconf_variant"),
    (dict(enable_conf=True, threshold=1.0, deepconf_variant="low"), ValueError, "explicit threshold"),
    (dict(enable_conf=True, deepconf_variant="medium", deepconf_warmup_confidences=[1.0]), ValueError,
     "deepconf_variant"),
    (dict(enable_conf=True, deepconf_eta=0.0, deepconf_warmup_confidences=[1.0]), ValueError, "deepconf_eta"),
    (dict(enable_conf=True, deepconf_eta=1.5, deepconf_warmup_confidences=[1.0]), ValueError, "deepconf_eta"),
    (dict(enable_conf=True, deepconf_eta=math.nan, deepconf_warmup_confidences=[1.0]), ValueError, "deepconf_eta"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_confidences=[]), ValueError, "empty"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_confidences=[[1.0]]), ValueError, "1-D"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_confidences="high"), ValueError,
     "deepconf_warmup_confidences"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_confidences=[1.0, math.nan]), ValueError,
     "calibrated threshold is nan"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_traces=-1), ValueError, "deepconf_warmup_traces"),
    (dict(enable_conf=True, deepconf_variant="low", deepconf_warmup_traces=2), ValueError, "do_sample"),
    (dict(output_confidences=True, return_dict_in_generate=False), ValueError, "return_dict_in_generate"),
    (dict(enable_conf=True, threshold=1.0, num_beams=2), ValueError, "num_beams"),
    (dict(enable_conf=True, threshold=1.0, eos_token_id=None), ValueError, "eos_token_id"),
])
def test_bad_options_raise_before_generating(model, options, error, match):
    calls = []
    original = type(model).forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    kwargs = dict(prompts(2, 5), max_new_tokens=4, pad_token_id=0, eos_token_id=EOS)
    kwargs.update(options)
    type(model).forward = counting_forward
    try:
        with pytest.raises(error, match=match):
            deepconf_generate(model, **kwargs)
    finally:
        type(model).forward = original
    assert not calls


def test_encoder_decoder_refused():
    seq2seq = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        deepconf_generate(seq2seq, **prompts(1, 4), enable_conf=True, threshold=1.0, max_new_tokens=2, eos_token_id=1)
