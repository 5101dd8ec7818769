"""Tokens/s of vLLM sampling N traces per prompt, with per-token confidence three ways:

(a)  plain vLLM, no statistics;
(a') control: the engine that loads FusedecodeLogitsProcessor, no request asks (does strictly less
     than (b): its spread against (a) is the noise of the measurement);
(b)  fusedecode.vllm.generate: every token's statistics (topk_confidence at k=20 included), recorded
     inside the engine by one fused logit_stats pass per step and sent over the statistics channel;
(c)  DeepConf's official path: SamplingParams(logprobs=20), then each token's confidence computed
     offline from the returned logprobs (-mean of the top-k logprobs).

    VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=python python -P benchmarks/bench_vllm.py [--out FILE.md]
    python benchmarks/bench_vllm.py --model /path/to/Qwen2.5-0.5B-Instruct --traces 64   # on a GPU

On a GPU the engine runs vLLM's default, Model Runner V2 (async scheduling included); the table
says which runner and scheduling ran. benchmarks/vllm_gpu_check.sh runs the engine tests and this.

On CPU run in the venv of .ci/vllm_check.sh (vLLM's CPU build). The bundled target's vocabulary has
17 tokens, and vLLM 0.32 kills the engine for logprobs > V (torch.topk "selected index k out of range"
in the sampler), so (c) asks for logprobs=min(20, V): the whole vocabulary, which is what k=20 means
there.
Runs are interleaved (one of each per repeat) and the median of the repeats is reported.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

PROMPTS = ["6962+27=", "47+385=", "1+2=", "9999+9999=", "12+3456=", "8+8=", "505+5=", "31+69="]
TOPK = 20


def offline_confidence(outputs, topk=TOPK):
    """DeepConf's offline token confidence from vLLM's logprobs: -mean of the top-k logprobs per token
    (as its official code does, one Python pass over the logprob dicts)."""
    confidences = []
    for output in outputs:
        for completion in output.outputs:
            confidences.append(np.array([-np.mean(sorted((entry.logprob for entry in step.values()), reverse=True)[:topk])
                                         for step in completion.logprobs]))
    return confidences


def generated_tokens(outputs):
    return sum(len(completion.token_ids) for output in outputs for completion in output.outputs)


def commit():
    """The checkout's commit, "-dirty" when tracked files differ from it (read before measuring)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=32, help="sampled traces per prompt (SamplingParams.n)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--model", help="model path (default: the bundled target)")
    parser.add_argument("--dtype", default=None, help="default: float32 for the bundled target, auto otherwise")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    revision, load_before = commit(), os.getloadavg()[0]

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    import fusedecode.vllm as fv
    from fusedecode.hf import bundled_model_path

    bundled = args.model is None
    engine_args = dict(model=bundled_model_path("target") if bundled else args.model,
                       dtype=args.dtype or ("float32" if bundled else "auto"), max_num_seqs=args.max_num_seqs)
    if bundled:  # a tiny model: a small engine (two of them share the device)
        engine_args.update(max_model_len=64, enforce_eager=True, gpu_memory_utilization=0.05)
    else:
        engine_args.update(max_model_len=args.max_tokens + 128, gpu_memory_utilization=0.4)
    plain = LLM(**engine_args, max_logprobs=TOPK)
    with_processor = LLM(**engine_args, max_logprobs=TOPK, logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"])
    vocab = plain.llm_engine.vllm_config.model_config.get_vocab_size()
    logprobs = min(TOPK, vocab)
    config = with_processor.llm_engine.vllm_config
    runner = "Model Runner V2" if getattr(config, "use_v2_model_runner", False) else "V1 model runner"
    scheduling = "async" if config.scheduler_config.async_scheduling else "synchronous"
    sampling = SamplingParams(n=args.traces, temperature=1.0, max_tokens=args.max_tokens)
    with_logprobs = SamplingParams(n=args.traces, temperature=1.0, max_tokens=args.max_tokens, logprobs=logprobs)

    def run_plain():
        return generated_tokens(plain.generate(PROMPTS, sampling, use_tqdm=False))

    def run_control():
        return generated_tokens(with_processor.generate(PROMPTS, sampling, use_tqdm=False))

    def run_fusedecode():
        results = fv.generate(with_processor, PROMPTS, sampling, topk=TOPK)
        return sum(len(stats.topk_confidence) for result in results for stats in result.stats)

    def run_logprobs():
        return sum(len(c) for c in offline_confidence(plain.generate(PROMPTS, with_logprobs, use_tqdm=False)))

    runs = {"(a) plain vLLM": run_plain,
            "(a') processor loaded, no request asks (control)": run_control,
            f"(b) fusedecode statistics (topk={TOPK})": run_fusedecode,
            f"(c) logprobs={logprobs} + offline confidence": run_logprobs}
    for run in runs.values():  # warm-up
        run()
    rates = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base, logprobs_path = medians["(a) plain vLLM"], list(medians.values())[-1]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"vLLM {vllm.__version__} ({runner}, {scheduling} scheduling), torch {torch.__version__}, fusedecode "
             f"commit {revision}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"Machine: {machine()}, device {device}; load average before the run {load_before:.1f}, after "
             f"{os.getloadavg()[0]:.1f}",
             f"{'Bundled target' if bundled else args.model} (V = {vocab}), {len(PROMPTS)} prompts x N = "
             f"{args.traces} sampled traces (T = 1), "
             f"max_tokens {args.max_tokens}, max_num_seqs {args.max_num_seqs}; median of {args.repeats} interleaved "
             "repeats after a warm-up", "",
             "| config | tokens/s (median) | vs (a) | vs (c) | all repeats (tokens/s) |",
             "|---|---|---|---|---|"]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.0f} | {value / base:.2f}x | {value / logprobs_path:.2f}x | "
                     f"{', '.join(f'{r:.0f}' for r in sorted(rates[name]))} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    fv.default_collector().close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
