"""SRGen on the bundled arithmetic model: accuracy, activations and time overhead.

    python benchmarks/eval_srgen.py                 # 300 held-out problems, temperature 0.6, 3 seeds
    python benchmarks/eval_srgen.py --seeds 1 --problems 100

Same prompts, sampling and scoring as ``python -m fusedecode demo`` (``arithmetic.prompt_text``,
``extract_answer``, top_k=0, 60 new tokens), batches of 50. Variants, run interleaved batch by batch
so that a change in machine load hits them alike, each batch re-seeded identically:

- ``generate``: plain sampling;
- ``srgen, never triggers``: infinite thresholds, the bookkeeping cost alone (tokens must equal
  ``generate``'s, which is checked);
- ``srgen, default``: ``SRGenConfig()``, the paper's window 25 and k 4 with the official code's
  floors (std 0.5, threshold 1.8, warm-up threshold 3.0); the trigger rule is the official one
  (threshold from the 25 entropies before the step, first token untested);
- ``srgen, window 25, k 4, no floors``: the paper's window and k alone (floors 0, no trigger during
  the warm-up): the floors are sized for large models, and this model's step entropies at
  temperature 0.6 are almost all below 0.05 nats and reach 1.8 about once in 6000 tokens;
- ``srgen, sensitive``: a lower threshold for this model;
- ``srgen, sensitive, lr 0.1``: the same trigger with a 10x larger step, to see whether a stronger
  correction changes outcomes where the default step barely moves the distribution.

Time per generated token counts each sequence's real tokens (up to and including EOS). Writes a
markdown table to stdout and ``benchmarks/results/srgen-cpu-<date>.md`` and ``.json``.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
import transformers

import fusedecode
from fusedecode.demo import arithmetic
from fusedecode.demo.demo import cpu_name
from fusedecode.hf import SRGenConfig, bundled_model_path, srgen

SENSITIVE = SRGenConfig(window=10, k=2.0, min_std=0.1, min_threshold=0.3, warmup_threshold=0.3)
VARIANTS = (
    ("generate", None),
    ("srgen, never triggers", SRGenConfig(min_threshold=math.inf, warmup_threshold=math.inf)),
    ("srgen, default", SRGenConfig()),
    ("srgen, window 25, k 4, no floors", SRGenConfig(min_std=0.0, min_threshold=0.0, warmup_threshold=math.inf)),
    ("srgen, sensitive", SENSITIVE),
    ("srgen, sensitive, lr 0.1", dataclasses.replace(SENSITIVE, lr=0.1)),
)


def git_commit():
    """Short commit, with ``+changes`` when the working tree differs from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=here,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_meta():
    """The machine and software of a run, and the load average at its start."""
    return dict(cpu=cpu_name(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, fusedecode=fusedecode.__version__, commit=git_commit(),
                load_before=load_average())


def write_results(directory, name, title, table, meta, rows):
    """``<directory>/<name>-<date>.md`` (the table under ``title``) and ``.json`` (meta and rows)."""
    os.makedirs(directory, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = os.path.join(directory, f"{name}-{date}")
    with open(stem + ".md", "w") as handle:
        handle.write(f"# {title} ({date})\n\n" + table + "\n")
    with open(stem + ".json", "w") as handle:
        json.dump({"meta": meta, "results": rows}, handle, indent=1)
    print(f"\nwrote {stem}.md and .json ({meta['wall_seconds']:.0f} s)")


def mcnemar_p(fixed, broken):
    """Exact two-sided McNemar p-value: how likely a split at least this uneven of the discordant
    pairs is if SRGen neither helps nor hurts."""
    total = fixed + broken
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, i) for i in range(min(fixed, broken) + 1)) / 2 ** total
    return min(1.0, 2 * tail)


def real_token_counts(new_tokens, eos_token_id, pad_token_id):
    """Generated tokens per row up to and including the first EOS (the rest is padding)."""
    is_eos = new_tokens == eos_token_id
    after_eos = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return (~after_eos & ((new_tokens != pad_token_id) | is_eos)).sum(dim=1)


def run_batch(model, encoded, config, seed, generate_kwargs):
    """One batch under one variant: (sequences, corrections or None, (wall, CPU) seconds)."""
    torch.manual_seed(seed)
    extra = {} if config is None else dict(custom_generate=srgen, srgen_config=config, return_dict_in_generate=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    out = model.generate(**encoded, **generate_kwargs, **extra)
    seconds = (time.perf_counter() - start, time.process_time() - start_cpu)
    if config is None:
        return out, None, seconds
    return out.sequences, out.corrections, seconds


def evaluate(model, tokenizer, problems, seeds, batch, temperature, max_new_tokens):
    """Per variant and seed: correct flags per problem, corrections per problem, tokens and seconds."""
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                           pad_token_id=tokenizer.pad_token_id)
    results = {name: {"correct": [], "corrections": [], "tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0}
               for name, _ in VARIANTS}
    warm = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems[:batch]], return_tensors="pt", padding=True)
    for _, config in VARIANTS:  # first calls pay one-off initialisation; keep it out of the timings
        run_batch(model, warm, config, 0, dict(generate_kwargs, max_new_tokens=8))
    for seed in seeds:
        for name, _ in VARIANTS:
            results[name]["correct"].append([])
            results[name]["corrections"].append([])
        for first in range(0, len(problems), batch):
            chunk = problems[first:first + batch]
            encoded = tokenizer([arithmetic.prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
            prompt_length = encoded["input_ids"].shape[1]
            plain_sequences = None
            for name, config in VARIANTS:
                sequences, corrections, seconds = run_batch(model, encoded, config, 1000 * seed + first,
                                                            generate_kwargs)
                if config is None:
                    plain_sequences = sequences
                elif name == "srgen, never triggers" and not torch.equal(sequences, plain_sequences):
                    raise AssertionError("srgen without triggers changed the generated tokens")
                new_tokens = sequences[:, prompt_length:]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                entry = results[name]
                entry["correct"][-1].extend(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, chunk))
                entry["corrections"][-1].extend(corrections if corrections is not None else [[] for _ in chunk])
                entry["tokens"] += int(real_token_counts(new_tokens, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id).sum())
                entry["seconds"] += seconds[0]
                entry["cpu_seconds"] += seconds[1]
            sys.stderr.write(f"\rseed {seed}: {min(first + batch, len(problems))}/{len(problems)} problems")
            sys.stderr.flush()
        sys.stderr.write("\n")
    return results


def summarise(results, problems_count):
    plain = results["generate"]
    plain_per_token = plain["seconds"] / plain["tokens"]
    plain_cpu_per_token = plain["cpu_seconds"] / plain["tokens"]
    rows = []
    for name, config in VARIANTS:
        entry = results[name]
        accuracies = [sum(flags) / problems_count for flags in entry["correct"]]
        activations = [sum(len(row) for row in seed_rows) for seed_rows in entry["corrections"]]
        all_corrections = [c for seed_rows in entry["corrections"] for row in seed_rows for c in row]
        touched = [(i, j) for i, seed_rows in enumerate(entry["corrections"]) for j, row in enumerate(seed_rows) if row]
        # Paired with plain generate on the same problem and seed (same seed, but the random stream
        # diverges after the first correction, so this is not a counterfactual of one sample).
        fixed = sum(entry["correct"][i][j] and not plain["correct"][i][j] for i, j in touched)
        broken = sum(plain["correct"][i][j] and not entry["correct"][i][j] for i, j in touched)
        per_token = entry["seconds"] / entry["tokens"]
        per_problem = [len(row) for seed_rows in entry["corrections"] for row in seed_rows]
        rows.append({
            "variant": name,
            "config": None if config is None else {k: getattr(config, k) for k in config.__dataclass_fields__},
            "accuracy_per_seed": accuracies,
            "accuracy_mean": sum(accuracies) / len(accuracies),
            "activations_per_seed": activations,
            "activations_per_problem": sum(activations) / (problems_count * len(activations)),
            # how many (problem, seed) pairs had 0, 1, 2, ... corrections
            "activation_histogram": [per_problem.count(n) for n in range(max(per_problem, default=0) + 1)],
            "problems_with_activation": len(touched),
            "problems_with_activation_fraction": len(touched) / (problems_count * len(activations)),
            "accuracy_on_activated_problems": (sum(entry["correct"][i][j] for i, j in touched) / len(touched)
                                               if touched else None),
            "plain_accuracy_on_same_problems": (sum(plain["correct"][i][j] for i, j in touched) / len(touched)
                                                if touched else None),
            "fixed_vs_generate": fixed,
            "broken_vs_generate": broken,
            "mcnemar_p": mcnemar_p(fixed, broken),
            "mean_entropy_before": (sum(c[1] for c in all_corrections) / len(all_corrections)
                                    if all_corrections else None),
            "mean_entropy_after": (sum(c[2] for c in all_corrections) / len(all_corrections)
                                   if all_corrections else None),
            "generated_tokens": entry["tokens"],
            "seconds": entry["seconds"],
            "cpu_seconds": entry["cpu_seconds"],
            "ms_per_token": 1e3 * per_token,
            "overhead_pct": 100 * (per_token / plain_per_token - 1),
            "cpu_overhead_pct": 100 * (entry["cpu_seconds"] / entry["tokens"] / plain_cpu_per_token - 1),
        })
    return rows


def optional(value, fmt):
    return "-" if value is None else format(value, fmt)


def markdown(rows, meta):
    lines = [
        f"SRGen on the bundled arithmetic target: {meta['problems']} held-out problems x {len(meta['seeds'])} "
        f"seed(s) {meta['seeds']}, temperature {meta['temperature']}, top_k 0, {meta['max_new_tokens']} new "
        f"tokens, batch {meta['batch']}.",
        f"CPU: {meta['cpu']} ({meta['torch_threads']} torch threads); torch {meta['torch']}, transformers "
        f"{meta['transformers']}, fusedecode {meta['fusedecode']} at {meta['commit']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after (a shared machine: times are indicative).",
        "",
        "| variant | accuracy (per seed) | activations / problem | problems with 0, 1, 2, ... | problems with >= 1 | "
        "accuracy there (generate there) | fixed / broken vs generate (McNemar p) | entropy before -> after | "
        "wall ms / token | overhead (wall) | overhead (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"])
        there = (f"{100 * r['accuracy_on_activated_problems']:.1f}% ({100 * r['plain_accuracy_on_same_problems']:.1f}%)"
                 if r["accuracy_on_activated_problems"] is not None else "-")
        entropy = (f"{r['mean_entropy_before']:.3f} -> {r['mean_entropy_after']:.3f}"
                   if r["mean_entropy_before"] is not None else "-")
        overhead = ("- | -" if r["variant"] == "generate"
                    else f"{r['overhead_pct']:+.1f}% | {r['cpu_overhead_pct']:+.1f}%")
        lines.append(f"| {r['variant']} | {100 * r['accuracy_mean']:.1f}% ({per_seed}) | "
                     f"{r['activations_per_problem']:.3f} | {', '.join(map(str, r['activation_histogram']))} | "
                     f"{r['problems_with_activation']} "
                     f"({100 * r['problems_with_activation_fraction']:.1f}%) | {there} | "
                     f"{r['fixed_vs_generate']} / {r['broken_vs_generate']} ({r['mcnemar_p']:.2f}) | {entropy} | "
                     f"{r['ms_per_token']:.3f} | {overhead} |")
    sensitive = next(r["config"] for r in rows if r["variant"] == "srgen, sensitive")
    lines += ["", f"sensitive: {sensitive}", "",
              "Activations: corrections made. 'accuracy there': accuracy of the variant on the (problem, seed) "
              "pairs where it corrected at least once, and of plain generate on the same pairs. 'fixed / broken': "
              "of those pairs, how many generate got wrong and the variant right, and the reverse (same seed, "
              "but the sampling streams part after the first correction)."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; each runs every problem once")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared CPU, two threads wait for each other in every "
                             "small matmul of this tiny model and make timings erratic)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = bundled_model_path("target")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    problems = arithmetic.evaluation_problems(args.problems)
    seeds = list(range(args.seeds))
    meta = dict(problems=args.problems, seeds=seeds, temperature=args.temperature, batch=args.batch,
                max_new_tokens=args.max_new_tokens, **run_meta())
    started = time.perf_counter()
    results = evaluate(model, tokenizer, problems, seeds, args.batch, args.temperature, args.max_new_tokens)
    meta.update(load_after=load_average(), wall_seconds=time.perf_counter() - started)
    rows = summarise(results, len(problems))
    table = markdown(rows, meta)
    print(table)
    write_results(args.out, "srgen-cpu", "SRGen evaluation", table, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
