"""Peak extra memory and time of scoring sequences: (a) model forward + materialised logits +
``logit_stats`` against (b) ``fusedecode.hf.score`` (the same forward, then ``linear_logit_stats``).

    python benchmarks/bench_scoring.py                # CPU: V = 32000 and 151936, T up to 8192; writes results
    python benchmarks/bench_scoring.py --tokens 1024 2048 --vocabs 32000 --no-write
    python benchmarks/bench_scoring.py --device cuda  # GPU: Qwen2-7B head (H = 3584, V = 152064), bf16

CPU, one run:
- model level, (a) vs (b): a 1-layer Llama-style model (H = 256, untied head of V rows), batch 1,
  at each T up to the largest one whose materialised logits fit in a third of the available memory
  (the rest by the formula below);
- op level, the must-show numbers: ``hidden @ weight.T`` + cpp ``logit_stats`` against cpp
  ``linear_logit_stats``, peak extra memory at T = 8192, V = 151936, H = 256 and time at T = 4096,
  V = 32000, H = 256.

Each memory measurement runs in a fresh subprocess: inputs built, one warm-up at 64 tokens, then the
peak-RSS counter reset (``/proc/self/clear_refs``) and the growth of ``VmHWM`` over the RSS at that
point reported as the peak extra memory of one call; the model-level time is the median of that
call and two more in the same process (one call when the logits exceed 1 GiB). The op-level times
are medians of ``--repeats`` calls in one process, the two variants interleaved.

Formula: (a) needs ``T * V * 4`` bytes of float32 logits on top of the forward's own memory F(T);
(b) needs one chunk, ``chunk * V * 4`` (about 48 MiB by default), on top of F(T) and the final
hidden states. F(T) is read off the measured (b) at the largest T, scaled linearly in T.
Writes ``benchmarks/results/scoring-cpu-<date>.{md,json}``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=False)
OP_MEMORY = dict(tokens=8192, vocab=151936, width=256)
OP_TIME = dict(tokens=4096, vocab=32000, width=256)
QWEN2_7B_HEAD = dict(vocab=152064, width=3584)
WARMUP_TOKENS = 64


# ------------------------------------------------------------------------------------------------
# Worker: one measurement in a fresh process


def _status_bytes(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(vocab, tokens):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=max(tokens, 128), **MODEL)
    return transformers.LlamaForCausalLM(config).eval()


def _calls(level, variant, tokens, vocab, width):
    """``call(n)``: one (a) or (b) call on the first n tokens."""
    import torch

    import fusedecode
    from fusedecode.hf import score

    generator = torch.Generator().manual_seed(0)
    if level == "model":
        model = _model(vocab, tokens)
        input_ids = torch.randint(0, vocab, (1, tokens), generator=generator)

        def materialised(n):
            with torch.no_grad():
                logits = model(input_ids=input_ids[:, :n], use_cache=False).logits  # [1, n, V]
            return fusedecode.logit_stats(logits[:, :-1], token_ids=input_ids[:, 1:n], backend="cpp")

        def fused(n):
            return score(model, input_ids[:, :n])
    else:
        hidden = torch.randn(tokens, width, generator=generator)
        weight = torch.randn(vocab, width, generator=generator) / width ** 0.5

        def materialised(n):
            return fusedecode.logit_stats(hidden[:n] @ weight.T, backend="cpp")

        def fused(n):
            return fusedecode.linear_logit_stats(hidden[:n], weight, backend="cpp")
    return materialised if variant == "a" else fused


def worker(level, variant, tokens, vocab, width):
    """Print a JSON line: peak extra memory of one call at T = tokens, and the median time of that
    call and up to two more (while the logits are at most 1 GiB: beyond, one call is tens of seconds)."""
    call = _calls(level, variant, tokens, vocab, width)
    call(WARMUP_TOKENS)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    baseline = _status_bytes("VmRSS")
    times = []
    for _ in range(3 if tokens * vocab * 4 <= 1 << 30 else 1):
        start = time.perf_counter()
        stats = call(tokens)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _status_bytes("VmHWM") - baseline
    print(json.dumps(dict(peak_extra_bytes=peak, seconds=statistics.median(times), calls=len(times),
                          mean_entropy=float(stats.entropy.mean()))))


def measure(level, variant, tokens, vocab, width):
    command = [sys.executable, os.path.abspath(__file__), "--worker", level, variant, str(tokens), str(vocab),
               str(width)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# CPU run


def available_bytes():
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def op_times(repeats):
    """Median seconds of (a) matmul + cpp logit_stats and (b) cpp linear_logit_stats at OP_TIME,
    interleaved in this process."""
    import torch

    import fusedecode

    tokens, vocab, width = OP_TIME["tokens"], OP_TIME["vocab"], OP_TIME["width"]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) / width ** 0.5
    variants = {"a": lambda: fusedecode.logit_stats(hidden @ weight.T, backend="cpp"),
                "b": lambda: fusedecode.linear_logit_stats(hidden, weight, backend="cpp")}
    samples = {name: [] for name in variants}
    for call in variants.values():
        call()
    for _ in range(repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return dict(OP_TIME, a_seconds=times["a"], b_seconds=times["b"], ratio=times["b"] / times["a"], repeats=repeats)


def model_rows(vocabs, token_counts, budget):
    rows = []
    for vocab in vocabs:
        for tokens in token_counts:
            logits_bytes = tokens * vocab * 4
            row = dict(level="model", vocab=vocab, tokens=tokens, width=MODEL["hidden_size"],
                       logits_bytes=logits_bytes)
            if logits_bytes > budget:
                row["skipped"] = f"materialised logits {logits_bytes / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            for variant in ("a", "b"):
                result = measure("model", variant, tokens, vocab, MODEL["hidden_size"])
                row[f"{variant}_peak_bytes"], row[f"{variant}_seconds"] = result["peak_extra_bytes"], result["seconds"]
                row[f"{variant}_mean_entropy"] = result["mean_entropy"]
            row["memory_ratio"] = row["a_peak_bytes"] / max(row["b_peak_bytes"], 1)
            row["time_ratio"] = row["b_seconds"] / row["a_seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def op_memory(budget):
    tokens, vocab, width = OP_MEMORY["tokens"], OP_MEMORY["vocab"], OP_MEMORY["width"]
    row = dict(OP_MEMORY, level="op", logits_bytes=tokens * vocab * 4)
    if row["logits_bytes"] > budget:  # measured at the largest T that fits, the rest by the formula
        tokens = max(1024, int(budget // (vocab * 4)) // 1024 * 1024)
        row["measured_tokens"] = tokens
    for variant in ("a", "b"):
        result = measure("op", variant, tokens, vocab, width)
        row[f"{variant}_peak_bytes"] = result["peak_extra_bytes"]
    row["memory_ratio"] = row["a_peak_bytes"] / max(row["b_peak_bytes"], 1)
    print(json.dumps(row), flush=True)
    return row


def formula(rows, chunk_bytes):
    """(a) and (b) at T = 32k from the largest measured T of each V: F(T) = measured (b) minus one
    chunk, scaled linearly in T."""
    predictions = []
    for vocab in sorted({row["vocab"] for row in rows}):
        measured = [row for row in rows if row["vocab"] == vocab and "b_peak_bytes" in row]
        if not measured:
            continue
        largest = max(measured, key=lambda row: row["tokens"])
        forward_per_token = max(largest["b_peak_bytes"] - chunk_bytes(vocab), 0) / largest["tokens"]
        tokens = 32768
        a = tokens * vocab * 4 + forward_per_token * tokens
        b = chunk_bytes(vocab) + forward_per_token * tokens
        predictions.append(dict(vocab=vocab, tokens=tokens, from_tokens=largest["tokens"],
                                forward_bytes_per_token=forward_per_token, a_bytes=a, b_bytes=b, ratio=a / b))
    return predictions


def mib(value):
    return f"{value / 2**20:,.0f}"


def report_lines(meta, rows, op_memory_row, op_time_row, predictions):
    lines = [f"# Scoring without [T, V] logits on CPU ({meta['date'][:10]})", "",
             f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}. "
             "Peak extra memory = growth of VmHWM over the RSS once the inputs exist (fresh process per "
             "measurement, after a 64-token warm-up); time = median of 3 calls in that process (1 call when "
             "the logits exceed 1 GiB).", "",
             "## Model forward + materialised logits + logit_stats (a) vs hf.score (b)", "",
             f"Model: 1-layer Llama-style, H = {MODEL['hidden_size']}, untied head, float32, batch 1.", "",
             "| V | T | (a) peak MiB | (b) peak MiB | memory ratio | (a) s | (b) s | time (b)/(a) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['vocab']} | {row['tokens']} | skipped: {row['skipped']} | | | | | |")
            continue
        lines.append(f"| {row['vocab']} | {row['tokens']} | {mib(row['a_peak_bytes'])} | {mib(row['b_peak_bytes'])} | "
                     f"{row['memory_ratio']:.1f}x | {row['a_seconds']:.2f} | {row['b_seconds']:.2f} | "
                     f"{row['time_ratio']:.2f} |")
    lines += ["", "Formula for T = 32768: (a) = T * V * 4 + F(T), (b) = chunk * V * 4 + F(T), F(T) = the "
              "forward's own memory per token (from (b) at the largest measured T) times T.", "",
              "| V | F per token (KiB, from T) | (a) GiB | (b) MiB | ratio |", "|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p['vocab']} | {p['forward_bytes_per_token'] / 1024:.1f} (T = {p['from_tokens']}) | "
                     f"{p['a_bytes'] / 2**30:.1f} | {mib(p['b_bytes'])} | {p['ratio']:.0f}x |")
    measured_tokens = op_memory_row.get("measured_tokens", op_memory_row["tokens"])
    lines += ["", "## Must-show checks (op level: hidden @ weight.T + cpp logit_stats (a) vs cpp linear_logit_stats (b))",
              "",
              f"- Peak extra memory at T = {measured_tokens}, V = {op_memory_row['vocab']}, H = "
              f"{op_memory_row['width']}: (a) {mib(op_memory_row['a_peak_bytes'])} MiB, (b) "
              f"{mib(op_memory_row['b_peak_bytes'])} MiB: **{op_memory_row['memory_ratio']:.0f}x** lower "
              f"(target >= 16x{'' if measured_tokens == op_memory_row['tokens'] else ', measured below T = 8192'}).",
              f"- CPU time at T = {op_time_row['tokens']}, V = {op_time_row['vocab']}, H = {op_time_row['width']} "
              f"(median of {op_time_row['repeats']}): (a) {op_time_row['a_seconds']:.3f} s, (b) "
              f"{op_time_row['b_seconds']:.3f} s: **(b)/(a) = {op_time_row['ratio']:.2f}** (target <= 1.2).", ""]
    return lines


def cpu_main(args):
    import torch

    from fusedecode._bench import git_commit
    from fusedecode.ops._tiled_head import default_chunk

    budget = available_bytes() / 3
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), machine=f"{platform.machine()} {platform.processor() or ''} "
                                            f"({os.cpu_count()} cores)".replace("  ", " "),
                threads=torch.get_num_threads(), torch=torch.__version__, budget_bytes=budget)
    rows = model_rows(args.vocabs, args.tokens, budget)
    op_memory_row = op_memory(budget)
    op_time_row = op_times(args.repeats)
    print(json.dumps(op_time_row), flush=True)
    predictions = formula(rows, lambda vocab: default_chunk(vocab) * vocab * 4)
    lines = report_lines(meta, rows, op_memory_row, op_time_row, predictions)
    print("\n".join(lines))
    if args.write:
        stem = os.path.join(args.out, f"scoring-cpu-{meta['date'][:10]}")
        with open(stem + ".md", "w") as handle:
            handle.write("\n".join(lines))
        with open(stem + ".json", "w") as handle:
            json.dump(dict(meta=meta, model=rows, op_memory=op_memory_row, op_time=op_time_row,
                           formula=predictions), handle, indent=1)


# ------------------------------------------------------------------------------------------------
# GPU run (in process, torch's allocator counters)


def cuda_main(args):
    """Op level on a GPU: bf16 hidden states and a Qwen2-7B head; peak extra allocated memory and
    median CUDA-event time of (a) ``(hidden @ weight.T)`` + logit_stats and (b) linear_logit_stats."""
    import torch

    import fusedecode

    vocab, width = QWEN2_7B_HEAD["vocab"], QWEN2_7B_HEAD["width"]
    rows = []
    for tokens in args.tokens:
        hidden = torch.randn(tokens, width, device="cuda").bfloat16()
        weight = (torch.randn(vocab, width, device="cuda") / width ** 0.5).bfloat16()
        variants = {"a": lambda: fusedecode.logit_stats(hidden @ weight.T),
                    "b": lambda: fusedecode.linear_logit_stats(hidden, weight)}
        row = dict(tokens=tokens, vocab=vocab, width=width, dtype="bfloat16")
        for name, call in variants.items():
            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            row[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - baseline
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            row[f"{name}_seconds"] = statistics.median(times)
        row["memory_ratio"] = row["a_peak_bytes"] / max(row["b_peak_bytes"], 1)
        row["time_ratio"] = row["b_seconds"] / row["a_seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del hidden, weight
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), handle, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=5, metavar=("LEVEL", "VARIANT", "T", "V", "H"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="T values (CPU default 1024 4096 8192; GPU default 8192 32768)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only")
    parser.add_argument("--json", help="--device cuda: write the rows here")
    args = parser.parse_args()
    if args.worker:
        level, variant, tokens, vocab, width = args.worker
        return worker(level, variant, int(tokens), int(vocab), int(width))
    if args.device == "cuda":
        args.tokens = args.tokens or [8192, 32768]
        return cuda_main(args)
    args.tokens = args.tokens or [1024, 4096, 8192]
    return cpu_main(args)


if __name__ == "__main__":
    main()
