"""CPU timing of logit_stats and verify_tree: the cpp backend against the torch reference and
torch.compile of the same math, repeated in rounds so that a shared, noisy machine still gives a
usable median (and minimum) per implementation.

    python benchmarks/sweep_cpu.py                        # 2 threads (torch's default here), 3 rounds
    python benchmarks/sweep_cpu.py --threads 1 --rounds 5 --json out.json

To compare two builds, run the script once with each on the path (the same shapes, same process
layout); every implementation of one build runs in the same process.
"""

import argparse
import functools
import json
import statistics
import sys

import torch

import fusedecode
from fusedecode import _bench
from fusedecode.reference import logit_stats_reference

LOGIT_SHAPES = [(64, 32000, torch.float32), (8, 151936, torch.bfloat16)]
VERIFY_SHAPE = (8, 32, 32000)  # B, N, V (bf16 target logits, a bushy tree)


def logit_stats_impls():
    impls = {}
    if "cpp" in fusedecode.available_backends():
        impls["cpp"] = functools.partial(fusedecode.logit_stats, backend="cpp")
    impls["torch"] = functools.partial(fusedecode.logit_stats, backend="torch")
    impls["torch.compile(reference)"] = torch.compile(logit_stats_reference)
    impls["torch.compile(minimal)"] = torch.compile(_bench.minimal_torch_composite)
    return impls


def verify_cases():
    batch, nodes, vocab = VERIFY_SHAPE
    g = torch.Generator().manual_seed(1)
    parents = torch.tensor([-1] + [max(0, (i - 1) // 4) for i in range(1, nodes)])
    tokens = torch.randint(0, vocab, (batch, nodes), generator=g)
    probs = torch.softmax(torch.randn(batch, nodes, vocab, generator=g), -1)
    backends = [b for b in ("cpp", "torch") if b in fusedecode.available_backends()]
    for mode, temperature, draft in (("greedy", 0.0, None), ("sample", 0.8, None), ("multi_draft", 0.8, probs)):
        for backend in backends:
            if backend == "torch" and mode == "multi_draft":
                continue  # a Python walk: seconds per call, not informative
            yield f"verify_tree {mode} {backend}", functools.partial(
                fusedecode.verify_tree, draft_tokens=tokens, parents=parents, temperature=temperature,
                draft_probs=draft, seed=3, backend=backend)


def measure(rounds, min_time):
    samples = {}
    batch, nodes, vocab = VERIFY_SHAPE
    verify_inputs = [x.view(batch, nodes, vocab)
                     for x in _bench.make_inputs(batch * nodes, vocab, torch.bfloat16, "cpu", copies=2)]
    impls = logit_stats_impls()
    for _ in range(rounds):
        for rows, vocab_size, dtype in LOGIT_SHAPES:
            inputs = _bench.make_inputs(rows, vocab_size, dtype, "cpu", copies=2)
            shape = f"[{rows}, {vocab_size}] {str(dtype).split('.')[-1]}"
            for name, fn in impls.items():
                seconds = _bench.cpu_time_per_call(fn, inputs, min_time=min_time)
                samples.setdefault(f"logit_stats {shape} {name}", []).append(seconds)
        for name, fn in verify_cases():
            seconds = _bench.cpu_time_per_call(lambda x, fn=fn: fn(x), verify_inputs, min_time=min_time)
            samples.setdefault(f"{name} {list(VERIFY_SHAPE)} bf16", []).append(seconds)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = measure(args.rounds, args.min_time)
    print(f"# {fusedecode.__file__}, {torch.get_num_threads()} threads, {args.rounds} rounds (ms per call)")
    print("| case | median ms | min ms |\n|---|---|---|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.3f} | {min(values) * 1e3:.3f} |")
    if args.json:
        meta = _bench.run_metadata("cpu", rounds=args.rounds)
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "samples_s": samples}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
