"""Plain generate vs HF assisted generation vs fusedecode tree speculation, same target/draft pair,
same prompts: tokens/s, and tokens per target forward (counted with a forward hook on the target).

    python benchmarks/bench_speculative.py                      # bundled arithmetic models, CPU
    python benchmarks/bench_speculative.py --json out.json --md out.md
    python benchmarks/bench_speculative.py --device cuda       # the same on a GPU

Greedy decoding (batch 1, the only batch HF assisted generation supports; plus tree speculation at
batch 8), and sampling at temperature 0.6 for tree speculation. Every greedy output is checked
token-for-token against plain generate.
"""

import argparse
import dataclasses
import json
import platform
import sys
import time

import torch

from fusedecode.demo import arithmetic
from fusedecode.demo.demo import ForwardCounter, load
from fusedecode.hf import TreeConfig, bundled_model_path, tree_speculative

TREE_CONFIGS = {
    "chain d8 k1 n8": TreeConfig(max_depth=8, top_k=1, max_nodes=8),
    "tree d12 k2 n24": TreeConfig(max_depth=12, top_k=2, max_nodes=24),
    "tree d32 k2 n64": TreeConfig(max_depth=32, top_k=2, max_nodes=64),
    "tree d32 k3 n64": TreeConfig(max_depth=32, top_k=3, max_nodes=64),
}
BATCHED = "tree d32 k2 n64"


def run(model, counter, prompts_batches, **kwargs):
    """Generate for every batch; tokens per forward is per row (a batched forward serves B rows)."""
    counter.count = 0
    new_tokens, start, outputs = 0, time.perf_counter(), []
    for enc in prompts_batches:
        out = model.generate(**enc, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        outputs.append(sequences)
        generated = sequences[:, enc["input_ids"].shape[1]:]
        new_tokens += int((generated != kwargs["pad_token_id"]).sum())
    elapsed = time.perf_counter() - start
    return dict(tokens=new_tokens, seconds=elapsed, tokens_per_s=new_tokens / elapsed,
                target_forwards=counter.count,
                tokens_per_forward=new_tokens / max(counter.count * prompts_batches[0]["input_ids"].shape[0], 1)), outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target, tokenizer = load(bundled_model_path("target"))
    draft, _ = load(bundled_model_path("draft"))
    target, draft = target.to(args.device), draft.to(args.device)
    counter = ForwardCounter(target)
    problems = arithmetic.evaluation_problems(args.problems)
    texts = [arithmetic.prompt_text(a, b) for a, b in problems]
    singles = [tokenizer([t], return_tensors="pt").to(args.device) for t in texts]
    batches = [tokenizer(texts[i:i + 8], return_tensors="pt", padding=True).to(args.device)
               for i in range(0, len(texts), 8)]
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    greedy = dict(common, do_sample=False)
    rows = []

    def record(name, batch, mode, result, reference=None, outputs=None):
        if reference is not None:
            result["identical_to_plain"] = all(torch.equal(a, b) for a, b in zip(reference, outputs))
        rows.append(dict(method=name, batch=batch, mode=mode, **result))
        print(f"{name:28s} B={batch} {mode:7s} {result['tokens_per_s']:8.1f} tok/s "
              f"{result['tokens_per_forward']:5.2f} tok/forward "
              f"{'identical' if result.get('identical_to_plain') else ''}", file=sys.stderr)

    run(target, counter, singles[:2], **greedy)  # warm-up
    plain, plain_out = run(target, counter, singles, **greedy)
    record("plain generate", 1, "greedy", plain)
    assisted, assisted_out = run(target, counter, singles, assistant_model=draft, **greedy)
    record("HF assisted (draft)", 1, "greedy", assisted, plain_out, assisted_out)
    for name, config in TREE_CONFIGS.items():
        result, out = run(target, counter, singles, custom_generate=tree_speculative, draft_model=draft,
                          tree_config=config, **greedy)
        record(f"fusedecode {name}", 1, "greedy", result, plain_out, out)
    plain8, plain8_out = run(target, counter, batches, **greedy)
    record("plain generate", 8, "greedy", plain8)
    result, out = run(target, counter, batches, custom_generate=tree_speculative, draft_model=draft,
                      tree_config=TREE_CONFIGS[BATCHED], **greedy)
    record(f"fusedecode {BATCHED}", 8, "greedy", result, plain8_out, out)
    sampled = dict(common, do_sample=True, temperature=0.6, top_k=0)
    torch.manual_seed(0)
    record("plain generate", 1, "T=0.6", run(target, counter, singles, **sampled)[0])
    torch.manual_seed(0)
    record("HF assisted (draft)", 1, "T=0.6", run(target, counter, singles, assistant_model=draft, **sampled)[0])
    for sampling in ("target_only", "multi_draft"):
        torch.manual_seed(0)
        config = dataclasses.replace(TREE_CONFIGS[BATCHED], sampling=sampling)
        record(f"fusedecode {BATCHED} {sampling}", 1, "T=0.6",
               run(target, counter, singles, custom_generate=tree_speculative, draft_model=draft,
                   tree_config=config, **sampled)[0])

    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, problems=args.problems, max_new_tokens=args.max_new_tokens,
                date=time.strftime("%Y-%m-%d"))
    lines = ["| method | batch | decoding | tokens/s | tokens per target forward | greedy output = plain |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        same = {True: "yes", False: "NO"}.get(row.get("identical_to_plain"), "")
        lines.append(f"| {row['method']} | {row['batch']} | {row['mode']} | {row['tokens_per_s']:.1f} | "
                     f"{row['tokens_per_forward']:.2f} | {same} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Speculative decoding on the bundled arithmetic models ({meta['date']}, {meta['device']}, "
                    f"{meta['threads']} CPU threads, torch {meta['torch']})\n\n{args.problems} held-out problems, "
                    f"up to {args.max_new_tokens} new tokens each. Tokens per target forward are per row: "
                    f"a batch-8 forward serves 8 rows (plain generate keeps finished rows in the batch).\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
