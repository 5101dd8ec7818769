"""fusedecode.hf.srgen (SRGen corrective decoding) on tiny random Llama/Qwen2 models and the bundled model."""

import math
import random
import statistics

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import SRGenConfig, bundled_model_path, srgen  # noqa: E402
from fusedecode.hf.srgen import EntropyTrigger, SRGenOutput  # noqa: E402
from hf_models import prompts, tiny_model  # noqa: E402

NEVER = SRGenConfig(min_threshold=math.inf, warmup_threshold=math.inf)
# Entropies are below log(96) < 5 nats, so mean - 100 * max(std, 1) is always below them.
ALWAYS = dict(k=-100.0, min_std=1.0, min_threshold=-1.0, warmup_threshold=-1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and much faster on a loaded machine,
    where two OpenMP threads wait for each other inside every small matmul."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingStreamer(transformers.generation.BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def reference_ce_entropy(hidden, weight, targets, delta, temperature, ignore_index=-100):
    """Naive float64 SRGen loss terms of one row: full [T, V] logits."""
    logits = (hidden.double() + delta) @ weight.double().T
    counted = targets != ignore_index
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs[counted].gather(1, targets[counted].unsqueeze(1)).squeeze(1)
    cross_entropy = -picked.mean() if counted.any() else logits.new_zeros(())
    last = torch.log_softmax(logits[-1] / temperature, dim=-1)
    return cross_entropy, -(last.exp() * last).sum()


def reference_delta(hidden, weight, targets, config, temperature):
    delta = torch.zeros(hidden.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=1e-8, eps=1e-5)
    for _ in range(config.steps):
        optimizer.zero_grad()
        cross_entropy, entropy = reference_ce_entropy(hidden, weight, targets, delta, temperature)
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
        assert [step for step, _, _ in row] == [0, 1, 2, 3, 4]
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
        assert [step for step, _, _ in out.corrections[row]] == [0, 1, 2]
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
    assert [step for step, _, _ in stopped.corrections[0]] == list(range(stop_step + 1))
    assert torch.equal(stopped.sequences[1:], free.sequences[1:])
    for row in (1, 2):
        assert [c[0] for c in stopped.corrections[row]] == [c[0] for c in free.corrections[row]] == list(range(10))
    # Once every row has stopped, generation stops.
    alone = model.generate(**{k: v[:1] for k, v in inputs.items()}, eos_token_id=eos, **kwargs)
    assert alone.sequences.shape == (1, 7 + stop_step)


def test_entropy_trigger_thresholds():
    config = SRGenConfig(window=4, k=1.5, min_std=0.3, min_threshold=1.0, warmup_threshold=2.5)
    rng = random.Random(0)
    entropies = [[rng.uniform(0.0, 4.0) for _ in range(3)] for _ in range(12)]
    trigger = EntropyTrigger(config, batch_size=3, device="cpu")
    history, decisions = [[], [], []], []
    for step, values in enumerate(entropies):
        active = [True, step < 6, step % 2 == 0]  # row 1 finishes; row 2 skips steps
        got = trigger.update(torch.tensor(values), torch.tensor(active)).tolist()
        for row in range(3):
            if not active[row]:
                assert not got[row]
                continue
            history[row].append(values[row])
            recent = history[row][-4:]
            if len(recent) < 4:
                threshold = 2.5
            else:
                spread = max(statistics.stdev(recent), 0.3)
                threshold = max(statistics.mean(recent) + 1.5 * spread, 1.0)
            assert float(trigger.threshold[row]) == pytest.approx(threshold, abs=1e-5), (step, row)
            if abs(values[row] - threshold) > 1e-5:
                assert got[row] == (values[row] > threshold), (step, row, values[row], threshold)
            decisions.append(got[row])
    assert any(decisions) and not all(decisions)


def test_streamer_gets_the_same_tokens():
    model = tiny_model("llama")
    inputs = prompts(2, 5)
    plain_streamer, srgen_streamer = RecordingStreamer(), RecordingStreamer()
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=plain_streamer)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, custom_generate=srgen,
                         srgen_config=NEVER, srgen_streamer=srgen_streamer)
    assert torch.equal(plain, out)
    assert len(plain_streamer.puts) == len(srgen_streamer.puts) == 7
    assert plain_streamer.ended == srgen_streamer.ended == 1
    assert all(torch.equal(a, b) for a, b in zip(plain_streamer.puts, srgen_streamer.puts))
    # Corrected steps are streamed as emitted; also under inference_mode.
    streamer = RecordingStreamer()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             custom_generate=srgen, srgen_config=SRGenConfig(max_corrections=3, **ALWAYS),
                             srgen_streamer=streamer)
    assert torch.equal(torch.cat([streamer.puts[0]] + [p[:, None] for p in streamer.puts[1:]], dim=1), out)


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
        assert [step for step, _, _ in corrections] == [0, 1]
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
    torch.manual_seed(0)
    soft_capped = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, pad_token_id=0, eos_token_id=2)).eval()
    with pytest.raises(ValueError, match="soft-capping"):
        soft_capped.generate(**inputs, max_new_tokens=3, custom_generate=srgen)


def test_bundled_model():
    from fusedecode.hf import arithmetic

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
    sensitive = SRGenConfig(window=10, k=1.0, min_threshold=0.3, warmup_threshold=0.5)
    torch.manual_seed(0)
    out = model.generate(**enc, custom_generate=srgen, srgen_config=sensitive, return_dict_in_generate=True, **kwargs)
    assert sum(len(row) for row in out.corrections) > 0
    texts = tokenizer.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, problems))
    assert correct >= 4, texts  # corrections must not wreck a model that solves most of these


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
        assert [step for step, _, _ in row] == [0, 1, 2, 3]
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
