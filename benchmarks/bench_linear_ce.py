"""Peak memory and time of one SRGen correction step on CPU: naive full-logits loss vs the fused
``linear_cross_entropy_entropy``.

    python benchmarks/bench_linear_ce.py                          # T in {512, 2048}, V = 32000, H = 256
    python benchmarks/bench_linear_ce.py --tokens 1024 --vocab 50000 --width 512 --chunks default 64
    python benchmarks/bench_linear_ce.py --device cuda --json out.json   # T = 8192, V = 151936, H = 896, bf16
    python benchmarks/bench_linear_ce.py --softcap 30                   # a Gemma-2-style soft-capped head

A correction step optimises a delta added to the final hidden states for 3 AdamW steps on
``0.95 * CE(context) + 0.05 * entropy(last row)``: forward, backward w.r.t. delta, optimiser step.
Each variant runs in a fresh subprocess, which resets its peak-RSS counter (``/proc/self/clear_refs``)
once the inputs are allocated and reports the growth of ``VmHWM`` over the RSS at that point: the
peak extra memory of the step. Writes ``benchmarks/results/linear_ce-cpu-<date>.{json,md}``.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

STEPS = 3
ENTROPY_WEIGHT = 0.05
BIG = dict(tokens=8192, vocab=151936, width=896)  # a 32k-context step on a Qwen2-0.5B-sized head


def _status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS


def soft_capped(logits, softcap):
    """The models' own final soft-capping (Gemma 2/3), for the naive variants; None: plain logits."""
    return logits if softcap is None else __import__("torch").tanh(logits / softcap) * softcap


def worker(variant, tokens, vocab, width, chunk, softcap=None):
    """Run one correction step in this process; print a JSON line with peak extra memory and time."""
    import torch
    import torch.nn.functional as F

    import fusedecode

    torch.manual_seed(0)
    hidden = torch.randn(tokens, width)
    weight = torch.randn(vocab, width) / width ** 0.5
    targets = torch.randint(0, vocab, (tokens,))
    targets[-1] = -100  # the current step has no target yet
    delta = torch.zeros(width, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=0.01)

    def naive_loss():
        logits = soft_capped((hidden + delta) @ weight.T, softcap)  # [T, V]
        ce = F.cross_entropy(logits, targets, ignore_index=-100)
        log_p = torch.log_softmax(logits[-1], dim=-1)
        entropy = -(log_p.exp() * log_p).sum()
        return ce, entropy

    def fused_loss():
        return fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, chunk=chunk,
                                                       softcap=softcap, backend="torch")

    loss_fn = naive_loss if variant == "naive" else fused_loss
    _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        ce, entropy = loss_fn()
        ((1 - ENTROPY_WEIGHT) * ce + ENTROPY_WEIGHT * entropy).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    print(json.dumps(dict(peak_extra_bytes=(peak_kib - baseline_kib) * 1024, seconds=seconds,
                          ce=float(ce), entropy=float(entropy), delta_norm=float(delta.detach().norm()))))


def cuda_measure(tokens, vocab, width, dtype_name, repeats, softcap=None):
    """On a GPU, in process: peak extra allocated memory (torch's allocator counter, reset after the
    inputs exist) and median time of one correction step, naive vs fused (backend auto: Triton)."""
    import statistics

    import torch
    import torch.nn.functional as F

    import fusedecode

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, device="cuda", dtype=dtype)
    weight = (torch.randn(vocab, width, device="cuda") / width ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    targets[-1] = -100

    def naive_loss(delta):
        logits = soft_capped(((hidden + delta.to(dtype)) @ weight.T).float(), softcap)
        ce = F.cross_entropy(logits, targets, ignore_index=-100)
        log_p = torch.log_softmax(logits[-1], dim=-1)
        return ce, -(log_p.exp() * log_p).sum()

    def fused_loss(delta):
        return fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, softcap=softcap)

    rows = []
    for variant, loss_fn in (("naive", naive_loss), ("fused", fused_loss)):
        def step():
            delta = torch.zeros(width, device="cuda", requires_grad=True)
            optimizer = torch.optim.AdamW([delta], lr=0.01)
            for _ in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                ce, entropy = loss_fn(delta)
                ((1 - ENTROPY_WEIGHT) * ce + ENTROPY_WEIGHT * entropy).backward()
                optimizer.step()
            return ce

        step()  # warm-up (Triton compilation, cuBLAS handles)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        ce = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rows.append(dict(variant=variant, tokens=tokens, vocab=vocab, width=width, dtype=dtype_name,
                         peak_extra_bytes=peak, seconds=statistics.median(times), ce=float(ce)))
    rows[1]["memory_ratio"] = rows[0]["peak_extra_bytes"] / max(rows[1]["peak_extra_bytes"], 1)
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def cuda_main(args):
    import torch

    rows = []
    for tokens in args.tokens:
        rows += cuda_measure(tokens, args.vocab, args.width, args.dtype, args.repeats, args.softcap)
    name = torch.cuda.get_device_name()
    lines = [f"# linear_cross_entropy_entropy on {name}", "",
             f"One SRGen correction step ({STEPS} AdamW steps on delta), {args.dtype} hidden/weight"
             f"{'' if args.softcap is None else f', soft-cap {args.softcap:g}'}; peak extra "
             "memory from torch.cuda.max_memory_allocated after the inputs; time = median of CUDA-event timings.",
             "", "| T | V | H | variant | peak extra MiB | time ms | memory ratio | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['vocab']} | {r['width']} | {r['variant']} | "
                     f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['seconds'] * 1e3:.2f} | "
                     f"{r.get('memory_ratio', 1.0):.1f}x | {r.get('speedup', 1.0):.2f}x |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(gpu=name, rows=rows), handle, indent=2)


def run_variant(variant, tokens, vocab, width, chunk, softcap=None):
    command = [sys.executable, __file__, "--worker", variant, str(tokens), str(vocab), str(width), str(chunk),
               "none" if softcap is None else repr(softcap)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", nargs="+", default=["default", "64"],
                        help="rows per chunk of the fused op ('default': about 48 MiB of float32 logits)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: measure in process with torch's allocator counters (default T = 8192, "
                             "V = 151936, H = 896, bfloat16)")
    parser.add_argument("--dtype", default="bfloat16", help="hidden/weight dtype for --device cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="--device cuda: write the rows here")
    parser.add_argument("--softcap", type=float, default=None,
                        help="final logit soft-cap of the head (Gemma 2: 30), applied by both variants")
    args = parser.parse_args()
    if args.device == "cuda":
        if args.tokens == [512, 2048]:
            args.tokens, args.vocab, args.width = [BIG["tokens"]], BIG["vocab"], BIG["width"]
        return cuda_main(args)

    from fusedecode.linear_ce import default_chunk

    rows = []
    for tokens in args.tokens:
        naive = run_variant("naive", tokens, args.vocab, args.width, 0, args.softcap)
        logits_bytes = tokens * args.vocab * 4
        rows.append(dict(variant="naive", tokens=tokens, vocab=args.vocab, width=args.width, chunk=None,
                         **naive, buffers=naive["peak_extra_bytes"] / logits_bytes))
        for chunk_arg in args.chunks:
            chunk = default_chunk(args.vocab) if chunk_arg == "default" else int(chunk_arg)
            fused = run_variant("fused", tokens, args.vocab, args.width, chunk, args.softcap)
            chunk_bytes = min(chunk, tokens) * args.vocab * 4
            extra = fused["peak_extra_bytes"]
            rows.append(dict(variant=f"fused chunk={chunk_arg}", tokens=tokens, vocab=args.vocab, width=args.width,
                             chunk=chunk, **fused,
                             buffers=(extra - tokens * args.width * 4) / chunk_bytes,
                             memory_ratio=naive["peak_extra_bytes"] / max(extra, 1),
                             ce_diff=abs(fused["ce"] - naive["ce"])))

    # The formula at the size SRGen meets on a long context, with the buffer counts measured above.
    naive_buffers = max(r["buffers"] for r in rows if r["variant"] == "naive")
    fused_buffers = max(r["buffers"] for r in rows if r["variant"] == "fused chunk=default")
    big_chunk = default_chunk(BIG["vocab"])
    big_naive = naive_buffers * BIG["tokens"] * BIG["vocab"] * 4
    big_fused = fused_buffers * big_chunk * BIG["vocab"] * 4 + BIG["tokens"] * BIG["width"] * 4
    formula = dict(**BIG, chunk=big_chunk, naive_buffers_of_TxV=naive_buffers, fused_buffers_of_chunkxV=fused_buffers,
                   naive_bytes=big_naive, fused_bytes=big_fused, ratio=big_naive / big_fused)

    date = datetime.date.today().isoformat()
    meta = dict(date=date, machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                steps=STEPS, softcap=args.softcap)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"linear_ce-cpu-{date}" + ("" if args.softcap is None else "-softcap"))
    with open(stem + ".json", "w") as handle:
        json.dump(dict(meta=meta, rows=rows, formula=formula), handle, indent=2)

    lines = [f"# linear_cross_entropy_entropy on CPU, {date}", "",
             f"One SRGen correction step ({STEPS} AdamW steps on delta: forward + backward), float32"
             f"{'' if args.softcap is None else f', soft-cap {args.softcap:g}'}, "
             f"{meta['cpus']} CPUs. Peak extra memory = growth of peak RSS over the RSS after the inputs are "
             f"allocated, each variant in a fresh process.", "",
             "| T | V | H | variant | peak extra MiB | buffers held | time s | memory ratio | abs(ce diff) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "T×V" if r["variant"] == "naive" else "chunk×V"
        lines.append(f"| {r['tokens']} | {r['vocab']} | {r['width']} | {r['variant']} "
                     f"| {r['peak_extra_bytes'] / 2**20:.1f} | {r['buffers']:.2f} {unit} | {r['seconds']:.2f} "
                     f"| {r.get('memory_ratio', 1.0):.1f}x | {r.get('ce_diff', 0.0):.2g} |")
    lines += ["", f"Formula at T = {BIG['tokens']}, V = {BIG['vocab']}, H = {BIG['width']} (chunk = {big_chunk}): "
              f"naive {naive_buffers:.2f} × T·V·4 B = {big_naive / 2**30:.2f} GiB; fused {fused_buffers:.2f} × "
              f"chunk·V·4 B + T·H·4 B = {big_fused / 2**20:.0f} MiB; ratio {formula['ratio']:.0f}x."]
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        variant, tokens, vocab, width, chunk, softcap = sys.argv[2:8]
        worker(variant, int(tokens), int(vocab), int(width), int(chunk), None if softcap == "none" else float(softcap))
    else:
        main()
