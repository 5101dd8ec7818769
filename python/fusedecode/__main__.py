"""Command line: ``python -m fusedecode {info,demo,sample,bench,hub-export}``.

    info        how fusedecode was built, which backends run here, the GPU seen
    demo        per-token uncertainty and self-certainty Best-of-N on the bundled model (transformers)
    sample      logit_stats on a few hand-made distributions
    bench       CPU benchmark table (cpp vs torch eager vs torch.compile)
    hub-export  write the Hugging Face Hub custom_generate folders (tree speculation, SRGen, DeepConf)
"""

import argparse
import functools
import json
import math
import sys

import torch

import fusedecode
from fusedecode import _bench
from fusedecode.reference import logit_stats_reference


def cmd_info(_args):
    info = fusedecode.build_info()
    print(f"fusedecode {info['version']}")
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key != "version":
            print(f"  {key:<{width}}  {value}")
    print(f"  {'backends':<{width}}  {', '.join(fusedecode.available_backends())}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  {'gpu' + str(i):<{width}}  {props.name} (sm_{props.major}{props.minor}, "
                  f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"  {'gpu':<{width}}  none visible")
    return 0


def _sample_logits():
    """Five rows that show what each statistic reacts to."""
    g = torch.Generator().manual_seed(0)
    vocab = 32000
    rows = {
        "confident": torch.randn(vocab, generator=g),
        "two-way tie": torch.randn(vocab, generator=g),
        "flat": torch.randn(vocab, generator=g) * 0.1,
        "spread": torch.randn(vocab, generator=g) * 3.0,
        "top-20 masked": torch.randn(vocab, generator=g) * 2.0,
    }
    rows["confident"][42] = 25.0
    rows["two-way tie"][[7, 9]] = 20.0
    keep = rows["top-20 masked"].topk(20).indices
    masked = torch.full((vocab,), -math.inf)
    masked[keep] = rows["top-20 masked"][keep]
    rows["top-20 masked"] = masked
    return list(rows), torch.stack(list(rows.values()))


def show_sample():
    names, logits = _sample_logits()
    backend = "cpp" if "cpp" in fusedecode.available_backends() else "torch"
    stats = fusedecode.logit_stats(logits, topk=20, token_ids=torch.zeros(len(names), dtype=torch.long),
                                   backend=backend)
    print(f"logit_stats of {len(names)} sample rows, V = {logits.shape[-1]} (backend {backend!r}, topk=20):\n")
    header = f"{'row':<14} {'entropy':>8} {'varent':>8} {'self-cert':>9} {'max logp':>9} {'argmax':>7} {'DeepConf':>9}"
    print(header)
    print("-" * len(header))
    for i, name in enumerate(names):
        print(f"{name:<14} {stats.entropy[i]:8.3f} {stats.varentropy[i]:8.3f} {stats.self_certainty[i]:9.3f} "
              f"{stats.max_logprob[i]:9.3f} {int(stats.argmax[i]):7d} {stats.topk_confidence[i]:9.3f}")
    print()


def cpu_benchmark(include_compile=True, min_time=0.3):
    """cpp backend vs the torch composite (the reference, "torch"), a minimal composite without
    masking/NaN handling ("torch-min") and torch.compile of the reference, on the Must-show shapes."""
    impls = {}
    if "cpp" in fusedecode.available_backends():
        impls["cpp"] = functools.partial(fusedecode.logit_stats, backend="cpp")
    impls["torch"] = functools.partial(fusedecode.logit_stats, backend="torch")
    impls["torch-min"] = _bench.minimal_torch_composite
    if include_compile:
        impls["torch.compile"] = torch.compile(logit_stats_reference)
    rows_out = []
    for rows, vocab, dtype in [(64, 32000, torch.float32), (8, 151936, torch.bfloat16)]:
        inputs = _bench.make_inputs(rows, vocab, dtype, "cpu", copies=2)
        times = {name: _bench.cpu_time_per_call(fn, inputs, min_time=min_time) for name, fn in impls.items()}
        rows_out.append(((rows, vocab, str(dtype).split(".")[-1]), times,
                         rows * vocab * inputs[0].element_size()))
    print(f"CPU benchmark ({torch.get_num_threads()} threads; median ms per call):\n")
    names = list(impls)
    header = f"{'shape':<22}" + "".join(f"{n:>15}" for n in names) + (
        f"{'vs torch':>10}{'vs torch-min':>13}{'vs compile':>12}" if "cpp" in impls else "")
    print(header)
    print("-" * len(header))
    for (rows, vocab, dtype), times, nbytes in rows_out:
        line = f"{f'[{rows}, {vocab}] {dtype}':<22}" + "".join(f"{times[n] * 1e3:15.3f}" for n in names)
        if "cpp" in times:
            line += f"{times['torch'] / times['cpp']:9.1f}x{times['torch-min'] / times['cpp']:12.1f}x"
            if "torch.compile" in times:
                line += f"{times['torch.compile'] / times['cpp']:11.2f}x"
        print(line)
    print()
    return rows_out


def cmd_demo(demo_argv):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("the demo needs transformers: pip install transformers (or use `make demo`)", file=sys.stderr)
        return 2
    from .demo.demo import main as demo_main

    return demo_main(demo_argv)


def cmd_sample(_args):
    show_sample()
    return 0


def cmd_bench(args):
    results = cpu_benchmark(include_compile=not args.no_compile, min_time=args.min_time)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{"shape": list(shape), "seconds": times, "bytes": nbytes}
                       for shape, times, nbytes in results], handle, indent=1)
    return 0


def cmd_hub_export(args):
    try:
        from .hf import hub
    except ImportError as error:
        print(f"hub-export needs transformers ({error}): pip install transformers", file=sys.stderr)
        return 2
    for path in hub.export(args.directory):
        print(path)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedecode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build facts, backends, GPU").set_defaults(func=cmd_info)
    # `demo` parses its own options (python -m fusedecode demo --help).
    sub.add_parser("demo", help="uncertainty and Best-of-N on the bundled model (demo --help for options)")
    sub.add_parser("sample", help="logit_stats on sample rows").set_defaults(func=cmd_sample)
    bench = sub.add_parser("bench", help="CPU benchmark table")
    bench.add_argument("--no-compile", action="store_true")
    bench.add_argument("--min-time", type=float, default=0.5)
    bench.add_argument("--json", default=None)
    bench.set_defaults(func=cmd_bench)
    export = sub.add_parser("hub-export", help="write the Hub custom_generate folders into a directory")
    export.add_argument("directory", help="where the folders go (examples/hub in the repository)")
    export.set_defaults(func=cmd_hub_export)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
