"""verify_tree against logit_stats alone (the floor of a one-pass op) and against the unfused
pipeline a serving engine runs (torch softmax to float32 probabilities, then a verification walk in
torch), in one run, for greedy and target-only sampling.

    python benchmarks/sweep_verify.py                          # GPU if present, else CPU
    python benchmarks/sweep_verify.py --device cpu --batch 1 8 --nodes 8 32 --vocab 32000
    python benchmarks/sweep_verify.py --json out.json
"""

import argparse
import json
import sys

import torch

import fusedecode
from fusedecode import _bench
from fusedecode.backends import unavailable_reason


def random_tree(batch, nodes, vocab, device, seed=0):
    """A bushy tree (each node has up to 4 children) with random tokens, shared by the batch."""
    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, nodes)]
    tokens = torch.randint(0, vocab, (batch, nodes), generator=g)
    return tokens.to(device), torch.tensor(parents).expand(batch, nodes).contiguous().to(device)


def unfused_pipeline(logits, tokens, parents, temperature, depth):
    """Engine-style verification: probabilities to memory, then a vectorised walk over the batch."""
    batch, nodes, vocab = logits.shape
    if temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        choice = torch.multinomial(probs.view(-1, vocab), 1).view(batch, nodes)
    else:
        probs = torch.softmax(logits.float(), dim=-1)
        choice = probs.argmax(dim=-1)
    rows = torch.arange(batch, device=logits.device)
    node = torch.zeros(batch, dtype=torch.long, device=logits.device)
    alive = torch.ones(batch, dtype=torch.bool, device=logits.device)
    accepted = torch.zeros(batch, dtype=torch.long, device=logits.device)
    index = torch.arange(nodes, device=logits.device)
    for _ in range(depth):
        wanted = choice[rows, node]
        match = (parents == node.unsqueeze(1)) & (tokens == wanted.unsqueeze(1)) & (index > 0)
        found = match.any(dim=1) & alive
        first = torch.where(match, index, nodes).min(dim=1).values
        node = torch.where(found, first, node)
        accepted += found.long()
        alive &= found
    return accepted, choice[rows, node]


def measure(device, batches, node_counts, vocabs, modes, replays, json_path=None):
    backend = next(b for b in ("cuda", "cpp", "triton", "torch") if unavailable_reason(b, device) is None)
    report = {"meta": _bench.run_metadata(device, backend=backend), "results": []}
    for vocab in vocabs:
        for batch in batches:
            for nodes in node_counts:
                nbytes = batch * nodes * vocab * 2
                copies = _bench.copies_for_l2(nbytes, device, cap_bytes=2 << 30, max_copies=64)
                inputs = _bench.make_inputs(batch * nodes, vocab, torch.bfloat16, device, copies)
                inputs = [x.view(batch, nodes, vocab) for x in inputs]
                tokens, parents = random_tree(batch, nodes, vocab, device)
                seeds = torch.arange(batch, dtype=torch.int64, device=device)
                depth = int(fusedecode.tree.tree_depths(parents[0].cpu()).max())
                for mode in modes:
                    temperature = 0.0 if mode == "greedy" else 0.8
                    impls = {
                        "verify_tree": lambda x, t=temperature: fusedecode.verify_tree(
                            x, tokens, parents, temperature=t, seed=seeds, validate=False, backend=backend),
                        "logit_stats": lambda x, t=temperature: fusedecode.logit_stats(
                            x, temperature=t if t > 0 else 1.0, backend=backend),
                        "unfused": lambda x, t=temperature: unfused_pipeline(x, tokens, parents, t, depth),
                    }
                    times = {name: _bench.time_per_call(fn, inputs, device, replays)[0] for name, fn in impls.items()}
                    entry = {"batch": batch, "nodes": nodes, "vocab": vocab, "mode": mode, "bytes": nbytes,
                             **{f"{k}_s": v for k, v in times.items()},
                             "verify_vs_stats": times["verify_tree"] / times["logit_stats"],
                             "unfused_vs_verify": times["unfused"] / times["verify_tree"]}
                    _bench.record(entry, report, json_path)
                del inputs
    return report


def table(report):
    lines = ["| mode | B | N | V | MB | verify_tree us | logit_stats us | unfused us | verify / stats | "
             "unfused / verify |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['nodes']} | {r['vocab']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['verify_tree_s'] * 1e6:.1f} | {r['logit_stats_s'] * 1e6:.1f} | {r['unfused_s'] * 1e6:.1f} | "
                     f"{r['verify_vs_stats']:.2f}x | {r['unfused_vs_verify']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = measure(args.device, args.batch, args.nodes, args.vocab, args.modes, args.replays, args.json)
    print(table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
