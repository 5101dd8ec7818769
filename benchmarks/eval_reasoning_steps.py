"""Reflection insertion and SRGen on the bundled arithmetic model: accuracy and tokens at the same seeds.

    python benchmarks/eval_reasoning_steps.py                      # 300 held-out problems, 3 seeds
    python benchmarks/eval_reasoning_steps.py --model PATH --reflection ";" --problems 100 --seeds 1

Same prompts, sampling and scoring as ``python -m fusedecode demo`` and ``eval_srgen.py``
(``arithmetic.prompt_text``, ``extract_answer``, temperature 0.6, top_k 0, 60 new tokens), batches of
50, every variant re-seeded identically batch by batch. Steps are the worked answer's digit steps,
cut at ``;`` and ``|`` (``7+5+0=12;`` is one step). Variants:

- ``sampling``: plain ``generate``;
- ``srgen``: SRGen's corrective decoding with the demo's trigger (``DEMO_SRGEN``; the paper's defaults
  never fire on this model, see ``eval_srgen.py``);
- ``insert at step``: ``ReflectionInsertion`` with a ``StepTrigger``: at the end of a step whose mean
  token entropy is above a threshold, insert the reflection tokens (at most ``--max-insertions``). The
  threshold is the ``--step-quantile`` quantile of the step mean entropies of plain sampling on
  separate calibration problems (never the evaluated ones);
- ``insert at token``: the same insertion with SRGen's entropy rule (the demo's trigger settings) as
  its trigger: the reflection replaces the uncertain token;
- ``srgen + insert at step``: both, SRGen's correction inside the same decode loop (``srgen`` applies
  the pair; it does not correct inserted tokens).

Tokens count each sequence's real tokens, inserted ones included, up to and including EOS.

The bundled model was trained on worked answers only: it has never seen a reflection phrase, and its
character vocabulary (``0-9 + = ; |``) cannot even spell one. The default reflection is ``;``, an extra
step separator, the closest thing to "stop and start the step again" this format has; the table shows
what this model does with it, nothing more. ``--model`` and ``--reflection`` take another model
trained to use a phrase. Writes a markdown table and JSON to ``benchmarks/results/``.
"""

import argparse
import os
import random
import sys
import time

import torch
import transformers

from fusedecode.demo import arithmetic
from fusedecode.demo.demo import DEMO_SRGEN
from fusedecode.hf import ReflectionInsertion, UncertaintyProcessor, bundled_model_path, srgen
from fusedecode.reflection import ReflectionConfig
from fusedecode.triggers import StepTrigger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_srgen import load_average, mcnemar_p, real_token_counts, run_meta, write_results  # noqa: E402

VARIANTS = ("sampling", "srgen", "insert at step", "insert at token", "srgen + insert at step")


def token_ids(tokenizer, text, name):
    """The ids of ``text`` without special tokens; refuses text the tokenizer cannot spell."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise SystemExit(f"{name} {text!r} is not in this tokenizer's vocabulary (ids {ids})")
    return ids


def calibration_problems(count, evaluated):
    """Problems drawn as in training, none of them evaluated."""
    rng, seen, problems = random.Random(20261207), set(evaluated), []
    while len(problems) < count:
        problem = arithmetic.make_problem(rng)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def step_threshold(model, tokenizer, problems, delimiters, quantile, generate_kwargs):
    """The ``quantile`` of the mean token entropy of the steps that end at a delimiter, plain sampling."""
    processor = UncertaintyProcessor(temperature=generate_kwargs["temperature"], delimiters=delimiters)
    encoded = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
    torch.manual_seed(12345)
    out = model.generate(**encoded, **generate_kwargs, logits_processor=[processor])
    means = torch.cat([s.mean[s.terminated] for s in processor.steps("entropy", out, tokenizer.eos_token_id)])
    return float(torch.quantile(means, quantile)), means.numel()


def variant_call(name, configs, tokenizer, temperature):
    """``generate`` keywords of a variant, and its ReflectionInsertion (or None)."""
    kwargs, inserter = {}, None
    if "srgen" in name:
        kwargs.update(custom_generate=srgen, srgen_config=DEMO_SRGEN, return_dict_in_generate=True)
    if "insert" in name:
        config = configs["step" if "at step" in name else "token"]
        inserter = ReflectionInsertion(config, eos_token_id=tokenizer.eos_token_id, temperature=temperature)
        kwargs.update(logits_processor=[inserter.processor], stopping_criteria=[inserter])
    return kwargs, inserter


def evaluate(model, tokenizer, problems, seeds, batch, configs, generate_kwargs):
    """Per variant and seed: correct flags, insertions and SRGen corrections per problem, tokens, seconds."""
    results = {name: {"correct": [], "insertions": [], "corrections": [], "tokens": 0, "seconds": 0.0}
               for name in VARIANTS}
    for seed in seeds:
        for name in VARIANTS:
            for key in ("correct", "insertions", "corrections"):
                results[name][key].append([])
        for first in range(0, len(problems), batch):
            chunk = problems[first:first + batch]
            encoded = tokenizer([arithmetic.prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
            prompt_length = encoded["input_ids"].shape[1]
            for name in VARIANTS:
                kwargs, inserter = variant_call(name, configs, tokenizer, generate_kwargs["temperature"])
                torch.manual_seed(1000 * seed + first)
                start = time.perf_counter()
                out = model.generate(**encoded, **generate_kwargs, **kwargs)
                entry = results[name]
                entry["seconds"] += time.perf_counter() - start
                sequences = out.sequences if "srgen" in name else out
                new_tokens = sequences[:, prompt_length:]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                entry["correct"][-1].extend(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, chunk))
                entry["insertions"][-1].extend(inserter.insertions if inserter else [[] for _ in chunk])
                entry["corrections"][-1].extend(out.corrections if "srgen" in name else [[] for _ in chunk])
                entry["tokens"] += int(real_token_counts(new_tokens, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id).sum())
            sys.stderr.write(f"\rseed {seed}: {min(first + batch, len(problems))}/{len(problems)} problems")
            sys.stderr.flush()
        sys.stderr.write("\n")
    return results


def summarise(results, problems_count):
    plain = results["sampling"]
    rows = []
    for name in VARIANTS:
        entry = results[name]
        runs = problems_count * len(entry["correct"])
        accuracies = [sum(flags) / problems_count for flags in entry["correct"]]
        pairs = [(i, j) for i in range(len(entry["correct"])) for j in range(problems_count)]
        # Paired with plain sampling on the same problem and seed: the random streams part at the
        # first insertion or correction, so a pair is not a counterfactual of one sample.
        acted = [(i, j) for i, j in pairs if entry["insertions"][i][j] or entry["corrections"][i][j]]
        fixed = sum(entry["correct"][i][j] and not plain["correct"][i][j] for i, j in acted)
        broken = sum(plain["correct"][i][j] and not entry["correct"][i][j] for i, j in acted)
        inserted = [x for i, j in pairs for x in entry["insertions"][i][j]]
        rows.append({
            "variant": name,
            "accuracy_per_seed": accuracies,
            "accuracy_mean": sum(accuracies) / len(accuracies),
            "tokens_per_problem": entry["tokens"] / runs,
            "insertions_per_problem": len(inserted) / runs,
            "inserted_tokens_per_problem": sum(x.inserted for x in inserted) / runs,
            "corrections_per_problem": sum(len(entry["corrections"][i][j]) for i, j in pairs) / runs,
            "problems_acted_on": len(acted),
            "accuracy_where_acted": sum(entry["correct"][i][j] for i, j in acted) / len(acted) if acted else None,
            "sampling_accuracy_there": sum(plain["correct"][i][j] for i, j in acted) / len(acted) if acted else None,
            "fixed_vs_sampling": fixed,
            "broken_vs_sampling": broken,
            "mcnemar_p": mcnemar_p(fixed, broken),
            "ms_per_token": 1e3 * entry["seconds"] / entry["tokens"],
        })
    return rows


def markdown(rows, meta):
    lines = [
        f"Model {meta['model']}; {meta['problems']} held-out problems x {len(meta['seeds'])} seed(s) {meta['seeds']}, "
        f"temperature {meta['temperature']}, top_k 0, {meta['max_new_tokens']} new tokens, batch {meta['batch']}.",
        f"Reflection tokens {meta['reflection']!r} = {meta['reflection_ids']}; steps end at {meta['delimiters']!r}; "
        f"at most {meta['max_insertions']} insertion(s) per trace.",
        f"Step trigger: mean token entropy of a step above {meta['step_threshold']:.4f} nats, the "
        f"{meta['step_quantile']} quantile of {meta['calibration_steps']} step means of plain sampling on "
        f"{meta['calibration_problems']} calibration problems (not evaluated). Token trigger and SRGen: the demo's "
        f"trigger {meta['srgen_trigger']}.",
        f"CPU: {meta['cpu']} ({meta['torch_threads']} torch threads); torch {meta['torch']}, transformers "
        f"{meta['transformers']}, fusedecode {meta['fusedecode']} at {meta['commit']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after (a shared machine: times are indicative).",
        "",
        "| variant | accuracy (per seed) | tokens / problem | insertions / problem (tokens) | SRGen corrections / "
        "problem | problems acted on | accuracy there (sampling there) | fixed / broken vs sampling (McNemar p) | "
        "wall ms / token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"])
        there = ("-" if r["accuracy_where_acted"] is None else
                 f"{100 * r['accuracy_where_acted']:.1f}% ({100 * r['sampling_accuracy_there']:.1f}%)")
        lines.append(f"| {r['variant']} | {100 * r['accuracy_mean']:.1f}% ({per_seed}) | "
                     f"{r['tokens_per_problem']:.1f} | {r['insertions_per_problem']:.3f} "
                     f"({r['inserted_tokens_per_problem']:.3f}) | "
                     f"{r['corrections_per_problem']:.3f} | {r['problems_acted_on']} | {there} | "
                     f"{r['fixed_vs_sampling']} / {r['broken_vs_sampling']} ({r['mcnemar_p']:.2f}) | "
                     f"{r['ms_per_token']:.3f} |")
    if meta["model"] == "bundled target":
        lines += ["", "The bundled model was trained on worked answers only: it has never seen a reflection phrase, "
                  "and its vocabulary cannot spell one; the inserted text is an extra step separator."]
    lines += ["", "'problems acted on': (problem, seed) pairs with at least one insertion or SRGen correction; "
              "'accuracy there': the variant's accuracy on those pairs, and plain sampling's on the same pairs; "
              "'fixed / broken': of those pairs, how many plain sampling got wrong and the variant right, and the "
              "reverse. A variant's trace is plain sampling's own (same seed, same draws) up to its first insertion "
              "or correction, so 'sampling there' is plain sampling's accuracy on exactly the traces where the "
              "trigger fires: how well the trigger finds traces going wrong, whatever the insertion then does."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled target)")
    parser.add_argument("--reflection", default=";", help="the text inserted (default ';', see above)")
    parser.add_argument("--delimiters", nargs="+", default=[";", "|"], help="texts that end a step")
    parser.add_argument("--max-insertions", type=int, default=1)
    parser.add_argument("--step-quantile", type=float, default=0.9)
    parser.add_argument("--calibration-problems", type=int, default=200)
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; each runs every problem once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a small shared CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = args.model or bundled_model_path("target")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    reflection = token_ids(tokenizer, args.reflection, "--reflection")
    delimiters = [token_ids(tokenizer, text, "--delimiters") for text in args.delimiters]
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature, top_k=0,
                           pad_token_id=tokenizer.pad_token_id)
    problems = arithmetic.evaluation_problems(args.problems)
    threshold, calibration_steps = step_threshold(model, tokenizer, calibration_problems(
        args.calibration_problems, problems), delimiters, args.step_quantile, generate_kwargs)
    configs = {"step": ReflectionConfig(reflection, StepTrigger(threshold=threshold), args.max_insertions, delimiters),
               "token": ReflectionConfig(reflection, DEMO_SRGEN.trigger, args.max_insertions, delimiters)}
    seeds = list(range(args.seeds))
    meta = dict(model=args.model or "bundled target", problems=args.problems, seeds=seeds,
                temperature=args.temperature, batch=args.batch, max_new_tokens=args.max_new_tokens,
                reflection=args.reflection, reflection_ids=reflection, delimiters=args.delimiters,
                max_insertions=args.max_insertions, step_threshold=threshold, step_quantile=args.step_quantile,
                calibration_steps=calibration_steps, calibration_problems=args.calibration_problems,
                srgen_trigger=dict(vars(DEMO_SRGEN.trigger)), **run_meta())
    started = time.perf_counter()
    results = evaluate(model, tokenizer, problems, seeds, args.batch, configs, generate_kwargs)
    meta.update(load_after=load_average(), wall_seconds=time.perf_counter() - started)
    rows = summarise(results, len(problems))
    table = markdown(rows, meta)
    print(table)
    write_results(args.out, "reasoning-steps-cpu", "Reflection insertion and SRGen", table, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
