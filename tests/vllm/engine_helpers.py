"""Shared by the engine tests: the bundled model's engines and references computed from vLLM's own
full distribution (the bundled vocabulary has 17 tokens, so ``logprobs=17`` returns all of it)."""

import gc
import math
import os
import tomllib

import numpy as np

VOCAB = 17
EOS = 2
PROMPTS = ["6962+27=", "47+385=", "1+2=", "9999+9999=", "12+3456=", "8+8=", "505+5=", "31+69="]
ENGINE_ARGS = dict(dtype="float32", max_model_len=64, enforce_eager=True, gpu_memory_utilization=0.05,
                   max_logprobs=VOCAB)
PROCESSOR = "fusedecode.vllm:FusedecodeLogitsProcessor"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ("entropy", "varentropy", "self_certainty", "logsumexp", "max_logprob", "token_logprob")


def model_path():
    import fusedecode.hf
    return fusedecode.hf.bundled_model_path("target")


def make_llm(**kwargs):
    from vllm import LLM
    return LLM(model=model_path(), **ENGINE_ARGS, **kwargs)


def shutdown(llm):
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()


def reference_stats(completion, temperature, topk):
    """Per-token statistics in float64 from vLLM's returned logprobs (raw, temperature 1), re-tempered
    (all but logsumexp: the logprobs are normalised)."""
    rows = {name: [] for name in FIELDS + ("topk_confidence",) if name != "logsumexp"}
    for token, logprobs in zip(completion.token_ids, completion.logprobs):
        assert len(logprobs) == VOCAB, "the reference needs the whole distribution (logprobs=17)"
        raw = np.array([logprobs[t].logprob for t in range(VOCAB)], np.float64)
        z = raw[np.isfinite(raw)] / temperature
        full = raw / temperature
        logsumexp = np.logaddexp.reduce(z)
        logp = z - logsumexp
        p = np.exp(logp)
        entropy = -(p * logp).sum()
        rows["entropy"].append(entropy)
        rows["varentropy"].append((p * (logp + entropy) ** 2).sum())
        rows["self_certainty"].append(logsumexp - z.mean() - math.log(len(z)))
        rows["max_logprob"].append(logp.max())
        rows["token_logprob"].append(full[token] - logsumexp)
        rows["topk_confidence"].append(-np.sort(logp)[::-1][:topk].mean() if topk else math.nan)
    return {name: np.array(values) for name, values in rows.items()}


def max_difference(results, temperature, topk):
    """Largest |fusedecode - reference| over every field and token of ``results`` (fusedecode.vllm
    Results whose requests asked vLLM for logprobs=17). vLLM's logprobs are normalised, so logsumexp
    is not comparable here (the HF comparison covers it)."""
    worst, count = 0.0, 0
    for result in results:
        for completion, stats in zip(result.request_output.outputs, result.stats):
            reference = reference_stats(completion, temperature, topk)
            assert len(stats.entropy) == len(completion.token_ids)
            for name in FIELDS + (("topk_confidence",) if topk else ()):
                if name == "logsumexp":
                    continue
                got = getattr(stats, name).double().numpy()
                worst = max(worst, float(np.abs(got - reference[name]).max()) if len(got) else 0.0)
            count += len(completion.token_ids)
    assert count > 0
    return worst


def first_stop(confidences, window, threshold, first_allowed=0):
    """The position DeepConf's rule stops at (the mean of the last ``window`` confidences, this one
    included, below ``threshold``, once ``window`` exist and EOS is allowed), or None."""
    values = np.asarray(confidences, np.float32).astype(np.float64)
    for position in range(max(window - 1, first_allowed), len(values)):
        if values[position - window + 1:position + 1].sum() / window < threshold:
            return position
    return None


def window_means(confidences, window):
    values = np.asarray(confidences, np.float32).astype(np.float64)
    return np.array([values[p - window + 1:p + 1].sum() / window for p in range(window - 1, len(values))])


def threshold_between(values, quantile, gap=1e-3):
    """A threshold near the ``quantile`` of ``values`` that lies midway between two of them at least
    ``gap`` apart, so that float noise cannot flip a comparison."""
    ordered = np.unique(np.round(np.asarray(values, np.float64), 9))
    start = int(quantile * (len(ordered) - 1))
    for low in range(start, len(ordered) - 1):
        if ordered[low + 1] - ordered[low] >= gap:
            return float((ordered[low] + ordered[low + 1]) / 2)
    raise AssertionError("no gap between the window means")


def write_entry_point(directory):
    """Installed metadata declaring pyproject.toml's vllm.logits_processors entry points."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        points = tomllib.load(handle)["project"]["entry-points"]["vllm.logits_processors"]
    info = directory / "fusedecode_entry_point_check-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fusedecode-entry-point-check\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[vllm.logits_processors]\n"
                                           + "".join(f"{name} = {value}\n" for name, value in points.items()))
    return points
