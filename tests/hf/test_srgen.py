"""fusedecode.hf.srgen (SRGen corrective decoding, the package fusedecode.hf.correction) on tiny
random models and the bundled model: identity without triggers, corrections against a naive float64
reference, the models' own head transforms (Gemma 2/3 soft-capping, Cohere and Granite logit
scales, Phi's lm_head bias), and the trigger rule against a transcription of the authors' code."""

import math
import random
import statistics

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import SRGenConfig, bundled_model_path, srgen  # noqa: E402
from fusedecode.hf.correction import SRGenOutput  # noqa: E402
from fusedecode.hf.models.head import corrected_logits, read_output_head  # noqa: E402
from fusedecode.hf.models.hidden import FinalHiddenCapture  # noqa: E402
from fusedecode.hf.correction.trigger import EntropyTrigger  # noqa: E402
from hf_models import prompts, tiny_model  # noqa: E402

NEVER = SRGenConfig(min_threshold=math.inf, warmup_threshold=math.inf)
# Entropies are below log(96) < 5 nats, so mean - 100 * max(std, 1) is always below them.
ALWAYS = dict(k=-100.0, min_std=1.0, min_threshold=-1.0, warmup_threshold=-1.0)


# Tiny models: one thread (tests/hf/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingStreamer(transformers.generation.BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def reference_ce_entropy(hidden, weight, targets, delta, temperature, ignore_index=-100, transform=None):
    """Naive float64 SRGen loss terms of one row: full [T, V] logits (then the head's ``transform``)."""
    logits = (hidden.double() + delta) @ weight.double().T
    if transform is not None:
        logits = transform(logits)
    counted = targets != ignore_index
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs[counted].gather(1, targets[counted].unsqueeze(1)).squeeze(1)
    cross_entropy = -picked.mean() if counted.any() else logits.new_zeros(())
    last = torch.log_softmax(logits[-1] / temperature, dim=-1)
    return cross_entropy, -(last.exp() * last).sum()


def reference_delta(hidden, weight, targets, config, temperature, transform=None):
    delta = torch.zeros(hidden.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=1e-8, eps=1e-5)
    for _ in range(config.steps):
        optimizer.zero_grad()
        cross_entropy, entropy = reference_ce_entropy(hidden, weight, targets, delta, temperature,
                                                      transform=transform)
        ((1 - config.entropy_weight) * cross_entropy + config.entropy_weight * entropy).backward()
        optimizer.step()
    return delta.detach()


def entropy_of(logits, temperature=1.0):
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    return float(-(log_probs.exp() * log_probs).sum())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("sampling", [False, True])
def test_never_trigger_is_plain_generate(kind, sampling):
    model = tiny_model(kind)
    inputs = prompts(3, 6)
    kwargs = dict(max_new_tokens=12, do_sample=sampling, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    if sampling:
        kwargs.update(temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(1)
    plain = model.generate(**inputs, **kwargs)
    torch.manual_seed(1)
    corrected = model.generate(**inputs, custom_generate=srgen, srgen_config=NEVER, **kwargs)
    assert torch.equal(plain.sequences, corrected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, corrected.scores))
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, corrected.logits))
    assert corrected.corrections == [[], [], []]
    torch.manual_seed(1)
    disabled = model.generate(**inputs, custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=0, **ALWAYS),
                              **kwargs)
    assert torch.equal(plain.sequences, disabled.sequences)


@pytest.mark.parametrize("kind,sampling", [("llama", False), ("qwen2", True)])
def test_always_trigger_gives_max_corrections_per_row(kind, sampling):
    model = tiny_model(kind)
    inputs = prompts(3, 6)
    config = SRGenConfig(max_corrections=5, **ALWAYS)
    torch.manual_seed(2)
    out = model.generate(**inputs, custom_generate=srgen, srgen_config=config, max_new_tokens=9, min_new_tokens=9,
                         do_sample=sampling, temperature=0.8, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out, SRGenOutput) and isinstance(out, transformers.generation.GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (3, 6 + 9)
    for row in out.corrections:
        assert [step for step, _, _ in row] == [1, 2, 3, 4, 5]  # step 0 (the prompt's token) is never tested
        assert all(before != after and math.isfinite(after) for _, before, after in row)
    # Without return_dict_in_generate, just the sequences.
    torch.manual_seed(2)
    sequences = model.generate(**inputs, custom_generate=srgen, srgen_config=config, max_new_tokens=9,
                               min_new_tokens=9, do_sample=sampling, temperature=0.8, pad_token_id=0)
    assert torch.equal(sequences, out.sequences)


@pytest.mark.parametrize("context_window", [None, 3])
def test_corrected_tokens_match_naive_reference(context_window):
    """Recompute every correction with full [T, V] logits in float64 from a cache-free forward of the
    output: the context CE must skip padding, see only the last context_window tokens, and the token
    must be the argmax of lm_head(hidden + delta)."""
    model = tiny_model("llama", seed=3)
    inputs = prompts(2, 7, seed=3)
    config = SRGenConfig(max_corrections=3, lr=0.1, steps=3, entropy_weight=0.3, context_window=context_window,
                         **ALWAYS)
    out = model.generate(**inputs, custom_generate=srgen, srgen_config=config, max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    sequences = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        hidden = model(input_ids=sequences, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    weight = model.get_output_embeddings().weight.detach()
    prompt_length = inputs["input_ids"].shape[1]
    for row in range(2):
        assert [step for step, _, _ in out.corrections[row]] == [1, 2, 3]
        for step, before, after in out.corrections[row]:
            current = prompt_length + step - 1  # the position whose hidden state predicts the new token
            targets = torch.where(mask[row, 1:current + 1].bool() & mask[row, :current].bool(),
                                  sequences[row, 1:current + 1], torch.tensor(-100))
            targets = torch.cat([targets, torch.tensor([-100])])
            start = max(0, current - context_window) if context_window else 0
            context = hidden[row, start:current + 1]
            delta = reference_delta(context, weight, targets[start:], config, temperature=1.0)
            logits = (hidden[row, current].double() + delta) @ weight.double().T
            assert int(logits.argmax()) == int(sequences[row, current + 1])
            assert torch.allclose(out.logits[step][row].double(), logits, atol=2e-4)
            assert before == pytest.approx(entropy_of(hidden[row, current].double() @ weight.double().T), abs=1e-4)
            assert after == pytest.approx(entropy_of(logits), abs=1e-4)


def test_eos_stops_rows_and_finished_rows_get_no_corrections():
    model = tiny_model("qwen2", seed=4)
    inputs = prompts(3, 6, seed=4)
    kwargs = dict(custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=20, **ALWAYS), max_new_tokens=10,
                  do_sample=False, pad_token_id=0, suppress_tokens=[2], return_dict_in_generate=True)
    free = model.generate(**inputs, **kwargs)  # token 2, the model's EOS, is never produced
    generated = free.sequences[:, 6:].tolist()
    # An EOS of our choosing: a token row 0 makes first at step >= 2 and the other rows never make.
    others = set(generated[1]) | set(generated[2]) | {0}
    stop_step, eos = next((step, token) for step, token in enumerate(generated[0])
                          if step >= 2 and token not in others and token not in generated[0][:step])
    stopped = model.generate(**inputs, eos_token_id=eos, **kwargs)
    assert stopped.sequences.shape == free.sequences.shape  # rows 1 and 2 run to max_new_tokens
    assert stopped.sequences[0, 6:7 + stop_step].tolist() == generated[0][:stop_step + 1]
    assert (stopped.sequences[0, 7 + stop_step:] == 0).all()
    assert [step for step, _, _ in stopped.corrections[0]] == list(range(1, stop_step + 1))
    assert torch.equal(stopped.sequences[1:], free.sequences[1:])
    for row in (1, 2):
        assert [c[0] for c in stopped.corrections[row]] == [c[0] for c in free.corrections[row]] == list(range(1, 10))
    # Once every row has stopped, generation stops.
    alone = model.generate(**{k: v[:1] for k, v in inputs.items()}, eos_token_id=eos, **kwargs)
    assert alone.sequences.shape == (1, 7 + stop_step)


def test_entropy_trigger_thresholds():
    """Per row: the threshold comes from the window of entropies before the step, the step's entropy
    is appended after the test, the first call (the prompt's step) is skipped, finished rows keep
    their history, and at most max_corrections triggers are granted."""
    config = SRGenConfig(window=4, k=1.5, min_std=0.3, min_threshold=1.0, warmup_threshold=2.5, max_corrections=1)
    rng = random.Random(0)
    entropies = [[rng.uniform(0.0, 4.0) for _ in range(3)] for _ in range(30)]
    trigger = EntropyTrigger(config, batch_size=3, device="cpu")
    history, granted, refused, decisions = [[], [], []], [0, 0, 0], 0, []
    for step, values in enumerate(entropies):
        active = [True, step < 8, step % 2 == 0]  # row 1 finishes; row 2 skips steps
        got = trigger.update(torch.tensor(values), torch.tensor(active)).tolist()
        if step == 0:
            assert got == [False, False, False]
            continue
        for row in range(3):
            if not active[row]:
                assert not got[row]
                continue
            recent = history[row][-4:]
            if len(recent) < 4:
                threshold = 2.5
            else:
                spread = max(statistics.stdev(recent), 0.3)
                threshold = max(statistics.mean(recent) + 1.5 * spread, 1.0)
            history[row].append(values[row])
            assert float(trigger.threshold[row]) == pytest.approx(threshold, abs=1e-5), (step, row)
            if abs(values[row] - threshold) > 1e-5:
                expected = values[row] > threshold and granted[row] < 1
                assert got[row] == expected, (step, row, values[row], threshold)
                granted[row] += expected
                refused += values[row] > threshold and not expected
            decisions.append(got[row])
    assert any(decisions) and not all(decisions)
    assert refused > 0  # the cap was reached somewhere


def official_trigger_steps(stream, window, k, min_std, min_threshold, warmup_threshold, max_retries):
    """The steps the authors' code corrects in one generation, transcribed as a plain loop from
    SRGen/tnot_decorator.py ``apply_entropy_control`` (the adaptive_entropy branch) and the retry loop
    of SRGen/base_evaluator.py ``generate_with_entropy_control`` (repository 2020-qqtcg/SRGen).

    ``stream[t]`` is the entropy of generated step t. Step 0 comes from the prompt stage of
    ``generate`` (``stage == "prompt"``: no test, no record). A later step is tested against the
    threshold from ``entropy_history[-N:]`` (float32 ``torch.mean`` and unbiased ``torch.std``)
    once ``len(entropy_history) + 1 > N``, else against ``entropy_threshold`` (the warm-up value);
    its entropy is appended before the test. A detection forces EOS; the next ``generate`` call's
    prompt stage re-does that step with the corrective delta (and is not tested). After
    ``max_retries`` detections the last one is not corrected and entropy control is switched off.
    """
    history, corrected, retries = [], [], 0
    for step, entropy in enumerate(stream):
        if step == 0:
            continue
        threshold = warmup_threshold
        if len(history) + 1 > window:
            recent = torch.tensor(history[-window:])
            std = max(torch.std(recent), min_std)
            threshold = max((torch.mean(recent) + k * std).item(), min_threshold)
        history.append(entropy)
        if torch.tensor(entropy) > threshold:
            retries += 1
            if retries >= max_retries:
                break  # the final generate runs without entropy control: no correction, no test
            corrected.append(step)
    return corrected


def entropy_streams(count, steps, seed):
    """Decoding-like entropy streams (float32 values): a per-stream baseline with noise, drifting
    regimes and rare spikes of a few nats."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 1, generator=generator) * 1.5
    noise = torch.rand(count, steps, generator=generator).pow(3) * (0.5 + torch.rand(count, 1, generator=generator))
    drift = torch.sin(torch.arange(steps) / (10 + 40 * torch.rand(count, 1, generator=generator))) * 0.3
    spikes = (torch.rand(count, steps, generator=generator) < 0.03) * (2 + 4 * torch.rand(count, steps,
                                                                                        generator=generator))
    return (base + noise + drift.clamp(min=-0.2) + spikes).clamp(min=0).float()


@pytest.mark.parametrize("settings", [
    dict(),  # the paper's defaults: window 25, k 4
    dict(window=4, k=1.0, min_std=0.1, min_threshold=0.5, warmup_threshold=1.5, max_corrections=2),
    dict(window=10, k=2.0, min_std=0.2, min_threshold=0.0, warmup_threshold=0.8, max_corrections=19),
], ids=["paper_defaults", "small_window_capped", "window_10"])
def test_trigger_matches_official_rule_on_entropy_streams(settings):
    """200 streams x 400 steps: the steps our trigger corrects are exactly the official code's."""
    config = SRGenConfig(**settings)
    streams = entropy_streams(200, 400, seed=12)
    trigger = EntropyTrigger(config, batch_size=200, device="cpu")
    ours = [[] for _ in range(200)]
    active = torch.ones(200, dtype=torch.bool)
    for step in range(400):
        for row in trigger.update(streams[:, step], active).nonzero().flatten().tolist():
            ours[row].append(step)
    official = [official_trigger_steps(streams[row].tolist(), config.window, config.k, config.min_std,
                                       config.min_threshold, config.warmup_threshold, config.max_corrections + 1)
                for row in range(200)]
    total = sum(map(len, official))
    assert total > 100, total  # the streams exercise the rule
    mismatched = [row for row in range(200) if ours[row] != official[row]]
    assert not mismatched, (f"{len(mismatched)} streams differ; official {total} corrections, ours "
                            f"{sum(map(len, ours))}; first: {official[mismatched[0]]} vs {ours[mismatched[0]]}")


def test_streamer_gets_the_same_tokens():
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    plain_streamer, srgen_streamer = RecordingStreamer(), RecordingStreamer()
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=plain_streamer)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, custom_generate=srgen,
                         srgen_config=NEVER, token_streamer=srgen_streamer)
    assert torch.equal(plain, out)
    assert len(plain_streamer.puts) == len(srgen_streamer.puts) == 7
    assert plain_streamer.ended == srgen_streamer.ended == 1
    assert all(torch.equal(a, b) for a, b in zip(plain_streamer.puts, srgen_streamer.puts))
    # Corrected steps are streamed as emitted; also under inference_mode.
    streamer = RecordingStreamer()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=3, **ALWAYS),
                             token_streamer=streamer)
    assert torch.equal(torch.cat([streamer.puts[0]] + [p[:, None] for p in streamer.puts[1:]], dim=1), out)


def test_srgen_streamer_is_a_deprecated_name_of_token_streamer():
    """srgen took its streamer as srgen_streamer= before both custom_generate callables took
    token_streamer=; the old name still streams, with a DeprecationWarning."""
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, custom_generate=srgen, srgen_config=NEVER)
    current, old = RecordingStreamer(), RecordingStreamer()
    out = model.generate(**inputs, token_streamer=current, **kwargs)
    with pytest.warns(DeprecationWarning, match="srgen_streamer"):
        assert torch.equal(model.generate(**inputs, srgen_streamer=old, **kwargs), out)
    assert len(old.puts) == len(current.puts) == 5 and old.ended == current.ended == 1
    assert all(torch.equal(a, b) for a, b in zip(old.puts, current.puts))
    with pytest.raises(ValueError, match="token_streamer"):
        model.generate(**inputs, token_streamer=RecordingStreamer(), srgen_streamer=RecordingStreamer(), **kwargs)


def test_return_dict_fields():
    model = tiny_model("qwen2")
    inputs = prompts(2, 5)
    torch.manual_seed(5)
    out = model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=True, temperature=0.6,
                         pad_token_id=0, custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=2, **ALWAYS),
                         return_dict_in_generate=True, output_scores=True, output_logits=True,
                         output_hidden_states=True)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 7
    assert out.scores[0].shape == out.logits[0].shape == (2, 96)
    assert out.attentions is None and out.past_key_values is not None
    for row, corrections in enumerate(out.corrections):
        assert [step for step, _, _ in corrections] == [1, 2]
        for step, before, after in corrections:
            # entropy_after is measured at the sampling temperature on the logits the token came from.
            assert after == pytest.approx(entropy_of(out.logits[step][row], temperature=0.6), abs=1e-4)
            chosen = out.sequences[row, 5 + step]
            assert out.scores[step][row, chosen] > -math.inf


def test_bad_settings_raise():
    for bad in (dict(window=1), dict(k=math.nan), dict(min_std=-0.1), dict(steps=0), dict(lr=0.0),
                dict(entropy_weight=1.5), dict(max_corrections=-1), dict(context_window=0),
                dict(min_threshold=math.nan)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SRGenConfig(**bad)
    with pytest.raises(TypeError, match="steps"):
        SRGenConfig(steps=2.0)
    with pytest.raises(TypeError, match="window"):
        SRGenConfig(window=True)
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    with pytest.raises(ValueError, match="srgen_config"):
        model.generate(**inputs, max_new_tokens=3, custom_generate=srgen, srgen_config={"k": 3.0}, pad_token_id=0)
    with pytest.raises(ValueError, match="beam"):
        model.generate(**inputs, max_new_tokens=3, num_beams=2, custom_generate=srgen, pad_token_id=0)
    seq2seq = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        seq2seq.generate(**inputs, max_new_tokens=3, custom_generate=srgen)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
                       attention_mask=inputs["attention_mask"], max_new_tokens=3, custom_generate=srgen, pad_token_id=0)
    unknown = unknown_head_transform_model()
    with pytest.raises(ValueError, match="does not know"):
        unknown.generate(**inputs, max_new_tokens=3, custom_generate=srgen, pad_token_id=0)


# ------------------------------------------------------------------------------------------------
# Head transforms: the corrected logits, the CE and the entropy use the model's own logits


def _scaled_head(model, seed):
    """Random-init heads give logits of ~0.1; scale them to a few units so that soft-capping and
    scales matter, and give a bias (if any) random values."""
    generator = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(60.0)
        if head.bias is not None:
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 2)
    return model


def transformed_head_model(family, seed=0):
    """A tiny random model (vocabulary 96, width 32, 2 layers) whose logits are not plain lm_head(h)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(config)
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=2.5)
        model = transformers.Gemma3ForCausalLM(config)
    elif family == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.3))
    elif family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=0.4))
    elif family == "phi":
        phi = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**phi))
    else:
        raise ValueError(family)
    return _scaled_head(model.eval(), seed)


def unknown_head_transform_model():
    """A Llama whose forward doubles its logits after lm_head: a transform no config declares."""
    model = tiny_model("llama")
    forward = model.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = doubled
    return model


FAMILIES = ["gemma2", "gemma3", "cohere", "granite", "phi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_corrected_logits_at_zero_delta_are_the_models_logits(family):
    model = transformed_head_model(family)
    inputs = prompts(3, 7)
    capture = FinalHiddenCapture(model)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        hidden = capture.take()
    finally:
        capture.remove()
    head = read_output_head(model)
    real = inputs["attention_mask"].bool()
    rebuilt = corrected_logits(hidden[real], None, head)
    assert torch.allclose(rebuilt, logits[real], rtol=1e-6, atol=1e-6 * float(logits.abs().max()))
    plain = torch.nn.functional.linear(hidden[real], model.get_output_embeddings().weight).float()
    assert (plain - logits[real]).abs().max() > 0.1  # the transform matters for these models


def _apply_transform64(logits, head):
    transform = head.transform
    if transform.bias is not None:
        logits = logits + transform.bias.detach().double()
    if transform.logit_scale is not None:
        logits = logits * transform.logit_scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_srgen_on_transformed_heads(family):
    """Without triggers: plain generate, token for token. With corrections at every step: each token
    is the argmax of the model's transformed logits at hidden + delta, delta optimised on the CE and
    entropy of those same transformed logits (float64 reference with full [T, V] logits)."""
    model = transformed_head_model(family, seed=1)
    inputs = prompts(2, 6, seed=1)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    plain = model.generate(**inputs, **kwargs)
    quiet = model.generate(**inputs, custom_generate=srgen, srgen_config=NEVER, **kwargs)
    assert torch.equal(plain.sequences, quiet.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, quiet.logits))

    config = SRGenConfig(max_corrections=2, lr=0.1, steps=3, entropy_weight=0.3, **ALWAYS)
    out = model.generate(**inputs, custom_generate=srgen, srgen_config=config, **kwargs)
    sequences = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        hidden = model(input_ids=sequences, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    head = read_output_head(model)
    weight = head.weight.detach()
    prompt_length = inputs["input_ids"].shape[1]
    for row in range(2):
        assert [step for step, _, _ in out.corrections[row]] == [1, 2]
        for step, before, after in out.corrections[row]:
            current = prompt_length + step - 1
            targets = torch.where(mask[row, 1:current + 1].bool() & mask[row, :current].bool(),
                                  sequences[row, 1:current + 1], torch.tensor(-100))
            targets = torch.cat([targets, torch.tensor([-100])])
            context = hidden[row, :current + 1]
            delta = reference_delta(context, weight, targets, config, 1.0, lambda z: _apply_transform64(z, head))
            logits = _apply_transform64((hidden[row, current].double() + delta) @ weight.double().T, head)
            assert int(logits.argmax()) == int(sequences[row, current + 1])
            assert torch.allclose(out.logits[step][row].double(), logits, atol=5e-4)
            uncorrected = _apply_transform64(hidden[row, current].double() @ weight.double().T, head)
            assert before == pytest.approx(entropy_of(uncorrected), abs=1e-4)
            assert after == pytest.approx(entropy_of(logits), abs=1e-4)


def test_unknown_head_transform_is_refused():
    model = unknown_head_transform_model()
    with pytest.raises(ValueError, match="does not know"):
        model.generate(**prompts(2, 5), custom_generate=srgen, max_new_tokens=3, pad_token_id=0)


def test_bundled_model_unchanged_when_never_triggered_and_accurate_when_correcting():
    from fusedecode.demo import arithmetic

    path = bundled_model_path("target")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    problems = arithmetic.evaluation_problems(8)
    enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=40, do_sample=True, temperature=0.6, top_k=0, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    plain = model.generate(**enc, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(plain, model.generate(**enc, custom_generate=srgen, srgen_config=NEVER, **kwargs))
    # The bundled target is rarely unsure (step entropies mostly under 0.3 nats at T = 0.6): a trigger
    # this sensitive is what makes it correct a few steps (4 here, 1 with floors 0.3 / 0.5).
    sensitive = SRGenConfig(window=10, k=1.0, min_std=0.05, min_threshold=0.1, warmup_threshold=0.2)
    torch.manual_seed(0)
    out = model.generate(**enc, custom_generate=srgen, srgen_config=sensitive, return_dict_in_generate=True, **kwargs)
    assert sum(len(row) for row in out.corrections) >= 2
    texts = tokenizer.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, problems))
    plain_texts = tokenizer.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    plain_correct = sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(plain_texts, problems))
    # Corrections must not wreck a model that solves most of these (6 of 8 with plain sampling).
    assert plain_correct >= 5 and correct >= plain_correct - 1, texts


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_never_and_always_trigger(dtype):
    """On a GPU the context CE runs through the Triton path of linear_cross_entropy_entropy."""
    model = tiny_model("llama").to("cuda", dtype)
    inputs = {name: value.cuda() for name, value in prompts(3, 6).items()}
    kwargs = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    plain = model.generate(**inputs, **kwargs)
    assert torch.equal(model.generate(**inputs, custom_generate=srgen, srgen_config=NEVER, **kwargs), plain)
    out = model.generate(**inputs, custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=4, **ALWAYS),
                         return_dict_in_generate=True, **kwargs)
    assert out.sequences.shape == plain.shape
    for row in out.corrections:
        assert [step for step, _, _ in row] == [1, 2, 3, 4]
        assert all(math.isfinite(before) and math.isfinite(after) for _, before, after in row)


def test_reads_final_hidden_states_without_every_layer():
    """The context's hidden states come from a hook on the decoder, not output_hidden_states (which
    would return every layer's states); the hook is gone after generate, also after an error."""
    model = tiny_model("llama")
    asked, forward = [], model.forward

    def spy(*args, **kwargs):
        asked.append(bool(kwargs.get("output_hidden_states")))
        return forward(*args, **kwargs)

    model.forward = spy
    out = model.generate(**prompts(2, 5), custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=2, **ALWAYS),
                         max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert asked and not any(asked)
    assert all(len(row) == 2 for row in out.corrections)
    assert not model.get_decoder()._forward_hooks

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    model.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(**prompts(2, 5), custom_generate=srgen, max_new_tokens=2, pad_token_id=0)
    assert not model.get_decoder()._forward_hooks
