"""fusedecode.hf on tiny random Llama- and Qwen2-style models and on the bundled models."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.hf import ConfidenceStopping, UncertaintyProcessor, best_of_n, bundled_model_path  # noqa: E402
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
    first = processor.entropy.clone()
    model.generate(**prompts(1, 4, seed=3), max_new_tokens=4, do_sample=False, pad_token_id=0,
                   logits_processor=[processor])
    assert processor.entropy.shape == (1, 4)  # a new call starts a new history
    assert not torch.equal(processor.entropy, first[:1, :4])
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
    never = ConfidenceStopping(window=3, threshold=-1e9, topk=5)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[never.processor], stopping_criteria=[never])
    assert out.shape[1] == 5 + 10
    always = ConfidenceStopping(window=3, threshold=1e9, topk=5)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         logits_processor=[always.processor], stopping_criteria=[always])
    assert out.shape[1] == 5 + 3  # stops as soon as the window is full
    with pytest.raises(ValueError, match="window"):
        ConfidenceStopping(window=0, threshold=1.0)
    with pytest.raises(ValueError, match="processor"):
        ConfidenceStopping(window=2, threshold=1.0, processor=UncertaintyProcessor(topk=0))


def test_best_of_n_borda():
    certainties = [3.0, 2.0, 1.0, 0.5]
    answers = ["a", "b", "b", "c"]
    winner, totals = best_of_n(certainties, answers, power=1.0)
    # Ranks 1..4 get weights 4, 3, 2, 1: a = 4, b = 3 + 2 = 5, c = 1.
    assert winner == "b" and totals == {"a": 4.0, "b": 5.0, "c": 1.0}
    assert best_of_n(certainties, answers, power=0)[0] == "b"  # majority vote
    assert best_of_n(certainties, ["x", "y", None, "y"], power=0)[0] == "y"
    # A tie in votes goes to the answer with the single highest self-certainty.
    assert best_of_n([1.0, 2.0], ["p", "q"], power=0)[0] == "q"
    assert best_of_n(torch.tensor([1.0, math.nan]), ["p", "q"], power=1.0)[0] == "p"
    with pytest.raises(ValueError):
        best_of_n([1.0], ["a", "b"])
    with pytest.raises(ValueError):
        UncertaintyProcessor(temperature=0)


def test_bundled_models_load_offline_and_solve_problems():
    from fusedecode.hf import arithmetic

    for name in ("target", "draft"):
        path = bundled_model_path(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        problems = arithmetic.evaluation_problems(40)
        enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct = sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, problems))
        # The models are small; the target must still solve most problems, the draft some.
        assert correct >= (20 if name == "target" else 4), (name, correct, texts[:3])


def test_demo_runs_and_writes_html(tmp_path):
    import subprocess
    import sys

    page = tmp_path / "demo.html"
    out = subprocess.run([sys.executable, "-m", "fusedecode", "demo", "--problems", "6", "--n", "3", "--show", "2",
                          "--speculate", "2", "--srgen", "10", "--html", str(page)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "self-certainty Borda voting" in out.stdout and "majority vote" in out.stdout
    assert "\x1b[38;2;" in out.stdout  # tokens coloured by entropy
    speculation = [line for line in out.stdout.splitlines() if "tree speculation" in line]
    assert speculation and speculation[0].rstrip().endswith("yes")  # same text as plain greedy decoding
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "entropy" in text and "Best-of-3" in text
    assert "Speculative decoding" in text and "SRGen" in text
    assert any(line.strip().startswith("SRGen (trigger tuned") for line in out.stdout.splitlines())
