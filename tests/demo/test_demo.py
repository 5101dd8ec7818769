"""The bundled arithmetic models (fusedecode.hf.bundled_model_path, trained by
fusedecode.demo.train_bundled) and the demo, ``python -m fusedecode demo``."""

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.demo import arithmetic  # noqa: E402
from fusedecode.hf import bundled_model_path  # noqa: E402


def test_bundled_models_load_offline_and_solve_problems():
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
                          "--speculate", "2", "--srgen", "10", "--deepconf", "3", "--html", str(page)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "self-certainty Borda voting" in out.stdout and "majority vote" in out.stdout
    assert "\x1b[38;2;" in out.stdout  # tokens coloured by entropy
    speculation = [line for line in out.stdout.splitlines() if "tree speculation" in line]
    assert speculation and speculation[0].rstrip().endswith("yes")  # same text as plain greedy decoding
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "entropy" in text and "Best-of-3" in text
    assert "Speculative decoding" in text and "SRGen" in text
    assert any(line.strip().startswith("SRGen (trigger tuned") for line in out.stdout.splitlines())
    assert "DeepConf" in out.stdout and "DeepConf" in text
