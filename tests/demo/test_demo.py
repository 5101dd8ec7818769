"""The bundled arithmetic models (fusedecode.hf.bundled_model_path, trained by
fusedecode.demo.train_bundled) and the demo, ``python -m fusedecode demo``."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusedecode.demo import arithmetic  # noqa: E402
from fusedecode.hf import bundled_model_path  # noqa: E402


def _load(name):
    return transformers.AutoModelForCausalLM.from_pretrained(bundled_model_path(name)).float().eval()


def test_bundled_models_load_offline_and_solve_problems():
    problems = arithmetic.evaluation_problems(40)
    for name in ("target", "draft"):
        model = _load(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path(name))
        enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct = sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, problems))
        # The target solves most problems but not all (the demo needs its uncertainty); the draft, the
        # weaker model, some (training_report.json has both accuracies on all 500 problems).
        low, high = (30, 39) if name == "target" else (8, 30)
        assert low <= correct <= high, (name, correct, texts[:3])


def test_bundled_pair_is_proportioned_like_a_deployment():
    """A deeper and wider target (about 10M parameters) with a shallow draft whose forward is a small
    fraction of the target's; float16 weights that fit in a wheel (about 40 MB for both)."""
    target, draft = _load("target"), _load("draft")
    target_params = sum(p.numel() for p in target.parameters())
    draft_params = sum(p.numel() for p in draft.parameters())
    assert 8e6 <= target_params <= 16e6 and draft_params <= 0.15 * target_params
    assert draft.config.num_hidden_layers <= 2 < target.config.num_hidden_layers
    assert draft.config.hidden_size < target.config.hidden_size
    stored = 0
    for name in ("target", "draft"):
        with open(os.path.join(bundled_model_path(name), "config.json")) as handle:
            config = json.load(handle)
        assert (config.get("dtype") or config.get("torch_dtype")) in ("float16", "bfloat16")
        stored += os.path.getsize(os.path.join(bundled_model_path(name), "model.safetensors"))
    assert stored <= 40e6
    with open(os.path.join(os.path.dirname(bundled_model_path("target")), "training_report.json")) as handle:
        report = json.load(handle)
    assert report["target"]["parameters"] == target_params and report["draft"]["parameters"] == draft_params
    assert 0.75 <= report["target"]["greedy_accuracy"] < 0.98 and report["draft"]["greedy_accuracy"] < 0.75


def _run_demo(tmp_path, threads, extra=()):
    page, results = tmp_path / f"demo{threads}.html", tmp_path / f"demo{threads}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "fusedecode", "demo", "--problems", "6", "--n", "3", "--show", "2",
                          "--speculate", "2", "--repeats", "1", "--srgen", "10", "--deepconf", "3", "--html", str(page),
                          "--json", str(results), *extra], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(results) as handle:
        return out.stdout, page.read_text(), json.load(handle)


def _without_wall_times(value):
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if k not in ("seconds", "forward_ms")}
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


def test_demo_runs_writes_html_and_does_not_depend_on_threads(tmp_path):
    stdout, text, results = _run_demo(tmp_path, 2)
    assert "self-certainty Borda voting" in stdout and "majority vote" in stdout
    assert "re-scored (hf.score): log-likelihood Borda" in stdout
    assert "\x1b[38;2;" in stdout  # tokens coloured by entropy
    speculation = [line for line in stdout.splitlines() if line.strip().startswith("fusedecode tree speculation")]
    assert speculation and speculation[0].rstrip().endswith("yes")  # same text as plain greedy decoding
    assert all(results["speculation"]["same"].values())
    assert any(line.strip().startswith("SRGen, trigger tuned") for line in stdout.splitlines())
    assert any(line.strip().startswith("SRGen, the paper's defaults") for line in stdout.splitlines())

    # The page leads with the side-by-side summary and keeps the terminal's explanations and headers.
    assert text.startswith("<!doctype html>")
    assert text.index("<h2>What each method buys") < text.index("<h2>Set-up") < text.index("<h2>Best-of-3")
    for explanation in ("Threads: torch runs on 1 thread", "Machine:", "Target:", "Draft:", "warm-up traces set the "
                        "threshold", "The paper's defaults: window 25", "The tuned trigger", "Speculative decoding",
                        "DeepConf", "entropy"):
        assert explanation in text, explanation
    tables = re.findall(r"<table>.*?</table>", text)
    assert len(tables) >= 6 and all("<thead><tr><th>" in table for table in tables)
    assert text.count("<svg") >= 2  # entropy over the answers, accuracy against samples
    # The summary's rows are the sections' numbers.
    best = results["best_of_n"]["accuracy"]
    assert f"accuracy {100 * best['self-certainty Borda voting (power 0.5)']:.1f}% vs " \
           f"{100 * best['majority vote over N']:.1f}%" in text

    # Every number but the wall times is the same with 1 and 2 threads: the demo pins one.
    _, _, one_thread = _run_demo(tmp_path, 1)
    assert results["torch_threads"] == one_thread["torch_threads"] == 1
    assert _without_wall_times(results) == _without_wall_times(one_thread)

    if shutil.which("chromium") is None:
        return
    # The page renders in a headless browser (where one is installed) to a non-blank screenshot.
    shot = tmp_path / "demo.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--window-size=1280,3000", f"--screenshot={shot}", f"file://{tmp_path / 'demo2.html'}"],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000
