"""fusedecode.vllm.deepconf's plumbing without an engine (generate replaced by a fake that records
what it was asked for): a seeded run must not repeat its warm-up traces among the final ones."""

from types import SimpleNamespace

import pytest
import torch

# A vLLM module, not "vllm": without vLLM installed, this folder imports as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (.ci/vllm_check.sh runs these tests)")

import fusedecode.vllm as fv  # noqa: E402
from fusedecode.vllm import _api  # noqa: E402
from vllm import SamplingParams  # noqa: E402


def fake_generate(calls):
    def generate(llm, prompt, params, **options):
        calls.append((params.n, params.seed, options.get("confidence_stop")))
        values = torch.linspace(1.0, 2.0, 6)
        stats = [fv.TraceStats(*(values,) * 7, stopped=False) for _ in range(params.n)]
        outputs = [SimpleNamespace(text="1+2=|3", token_ids=[5] * 6) for _ in range(params.n)]
        return [fv.Result(SimpleNamespace(outputs=outputs), stats)]
    return generate


@pytest.mark.parametrize("seed", [7, None])
def test_deepconf_final_traces_do_not_reuse_warmup_seeds(monkeypatch, seed):
    calls = []
    monkeypatch.setattr(_api, "generate", fake_generate(calls))
    result = fv.deepconf(object(), "1+2=", SamplingParams(temperature=1.0, seed=seed), extract_answer=lambda t: 3,
                         n_warmup=4, n=6, window=2)
    (warm_n, warm_seed, warm_stop), (final_n, final_seed, final_stop) = calls
    assert (warm_n, final_n) == (4, 6) and warm_stop is None and final_stop.window == 2
    # vLLM seeds completion i of a request with seed + i
    assert (warm_seed, final_seed) == ((7, 11) if seed == 7 else (None, None))
    assert result.answer == 3 and len(result.answers) == 10
