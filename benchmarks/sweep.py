"""Sweep of logit_stats: every available fused backend against the plain torch composite and
torch.compile of the same math, in one run, with the copy-bandwidth floor measured in that run.

    python benchmarks/sweep.py                      # GPU if present, else CPU; default grid
    python benchmarks/sweep.py --device cpu --rows 1 4 32 --vocab 32000 --dtypes float32
    python benchmarks/sweep.py --json out.json --plot out.png

GPU timings use CUDA graphs of calls over rotated inputs (see fusedecode/_bench.py); the floor of a
fused op is bytes read / copy bandwidth, reported as "% of copy".
"""

import argparse
import functools
import json
import sys

import torch

import fusedecode
from fusedecode import _bench
from fusedecode.backends import unavailable_reason
from fusedecode.reference import logit_stats_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def implementations(device, compile_dynamic):
    """name -> callable(logits) for everything that runs on ``device``."""
    impls = {}
    for backend in ("cuda", "triton", "cpp"):
        if unavailable_reason(backend, device) is None:
            impls[f"fused:{backend}"] = functools.partial(fusedecode.logit_stats, backend=backend)
    impls["torch"] = functools.partial(fusedecode.logit_stats, backend="torch")
    impls["torch-min"] = _bench.minimal_torch_composite
    compiled = torch.compile(logit_stats_reference, dynamic=compile_dynamic)
    impls["torch.compile"] = compiled
    return impls


def measure(device, rows_list, vocabs, dtype_names, impl_filter, compile_dynamic, replays, json_path=None):
    is_cuda = torch.device(device).type == "cuda"
    report = {"meta": _bench.run_metadata(device, compile_dynamic=compile_dynamic), "results": []}
    meta = report["meta"]
    if is_cuda:
        meta["empty_launch_us"] = _bench.cuda_empty_launch_time(device) * 1e6
        print(f"# {meta['device']}: copy {meta['copy_bandwidth_GBps']:.0f} GB/s, "
              f"empty launch {meta['empty_launch_us']:.2f} us", flush=True)
    impls = implementations(device, compile_dynamic)
    if impl_filter:
        impls = {k: v for k, v in impls.items() if any(f in k for f in impl_filter)}
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for vocab in vocabs:
            for rows in rows_list:
                nbytes = rows * vocab * torch.tensor([], dtype=dtype).element_size()
                copies = _bench.copies_for_l2(nbytes, device)
                inputs = _bench.make_inputs(rows, vocab, dtype, device, copies)
                for name, fn in impls.items():
                    try:
                        seconds, graphed = _bench.time_per_call(fn, inputs, device, replays)
                    except Exception as error:  # report, keep sweeping
                        print(f"# {name} failed at rows={rows} V={vocab} {dtype_name}: {error}", flush=True)
                        continue
                    entry = {"rows": rows, "vocab": vocab, "dtype": dtype_name, "impl": name,
                             "seconds": seconds, "GBps": nbytes / seconds / 1e9, "graph": graphed,
                             "bytes": nbytes}
                    if is_cuda:
                        entry["pct_of_copy"] = 100 * entry["GBps"] / meta["copy_bandwidth_GBps"]
                    _bench.record(entry, report, json_path)
                del inputs
                if is_cuda:
                    torch.cuda.empty_cache()
    return report


def table(report):
    """Markdown table: one line per (dtype, V, rows), microseconds per implementation."""
    results = report["results"]
    impls = sorted({r["impl"] for r in results}, key=lambda n: (not n.startswith("fused"), n))
    fused = [n for n in impls if n.startswith("fused")]
    lines = ["| dtype | V | rows | MB | " + " | ".join(f"{n} us" for n in impls) +
             " | " + " | ".join(f"{n} GB/s (% copy)" for n in fused) +
             " | best fused vs torch | vs compile |",
             "|" + "---|" * (4 + len(impls) + len(fused) + 2)]
    keys = sorted({(r["dtype"], r["vocab"], r["rows"]) for r in results})
    for dtype, vocab, rows in keys:
        by = {r["impl"]: r for r in results if (r["dtype"], r["vocab"], r["rows"]) == (dtype, vocab, rows)}
        if not by:
            continue
        nbytes = next(iter(by.values()))["bytes"]
        cells = [f"{by[n]['seconds'] * 1e6:.1f}" if n in by else "-" for n in impls]
        gb = []
        for n in fused:
            if n in by:
                pct = by[n].get("pct_of_copy")
                gb.append(f"{by[n]['GBps']:.0f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
            else:
                gb.append("-")
        best = min((by[n]["seconds"] for n in fused if n in by), default=None)
        vs_torch = f"{by['torch']['seconds'] / best:.1f}x" if best and "torch" in by else "-"
        vs_compile = f"{by['torch.compile']['seconds'] / best:.2f}x" if best and "torch.compile" in by else "-"
        lines.append(f"| {dtype} | {vocab} | {rows} | {nbytes / 1e6:.1f} | " + " | ".join(cells) + " | " +
                     " | ".join(gb) + f" | {vs_torch} | {vs_compile} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    panels = sorted({(r["dtype"], r["vocab"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (dtype, vocab) in zip(axes[0], panels):
        for impl in sorted({r["impl"] for r in results}):
            pts = sorted((r["rows"], r["GBps"]) for r in results
                         if r["impl"] == impl and r["dtype"] == dtype and r["vocab"] == vocab)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        if "copy_bandwidth_GBps" in report["meta"]:
            ax.axhline(report["meta"]["copy_bandwidth_GBps"], color="gray", linestyle="--", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel("GB/s of logits read")
        ax.set_title(f"{dtype}, V={vocab}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"logit_stats on {report['meta']['device']} ({report['meta']['date'][:10]}, "
                 f"{report['meta']['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32, 256, 1024])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--impls", nargs="*", default=None, help="substrings of implementation names to keep")
    parser.add_argument("--replays", type=int, default=25)
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="torch.compile(dynamic=True): one compilation for all shapes (default on GPU)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    compile_dynamic = args.compile_dynamic or torch.device(args.device).type == "cuda"
    report = measure(args.device, args.rows, args.vocab, args.dtypes, args.impls, compile_dynamic, args.replays,
                     args.json)
    print(table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
