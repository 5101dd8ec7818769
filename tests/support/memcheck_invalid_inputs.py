"""Invalid and hostile inputs for a memory checker (not a pytest module).

verify_tree with ``validate=False`` on draft tokens outside [0, V) (just past the end of a row,
10**7, +-2**62), parents out of range, cycles and self-parents, NaN / negative draft
probabilities; logit_stats on rows of far entries with tokens at the edges and top-k beyond n.
Every tensor is its own exact-size allocation, so a read past a row at the end of a buffer leaves
the allocation, which valgrind / AddressSanitizer (CPU) and compute-sanitizer (GPU) report.

    valgrind --tool=memcheck python tests/support/memcheck_invalid_inputs.py --device cpu   # .ci/memcheck.sh
    compute-sanitizer --tool memcheck python tests/support/memcheck_invalid_inputs.py --device cuda
"""

import argparse
import math
import sys

import torch

import fusedecode
from fusedecode.backends import unavailable_reason

F32_MIN = torch.finfo(torch.float32).min


def fresh(tensor, device):
    """An exact-size copy of ``tensor`` on ``device`` (its end is the end of the allocation)."""
    return tensor.to(device).clone().contiguous()


def verify_tree_cases(generator, trials):
    for trial in range(trials):
        batch = 1 + trial % 3
        nodes = 2 + trial % 7
        vocab = 1 + int(torch.randint(1, 97, (), generator=generator))
        logits = torch.randn((batch, nodes, vocab), generator=generator) * 3
        logits[..., :: 2 + trial % 3] = -1e20 if trial % 2 else F32_MIN
        tokens = torch.randint(-3, vocab + 40, (batch, nodes), generator=generator)
        # Past the end of the whole buffer from any row: such a read leaves the allocation.
        past_end = batch * nodes * vocab + torch.randint(0, 64, (batch, nodes), generator=generator)
        tokens = torch.where(torch.rand(tokens.shape, generator=generator) < 0.3, past_end, tokens)
        tokens[torch.rand(tokens.shape, generator=generator) < 0.1] = 10**7
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = 2**62
        tokens[torch.rand(tokens.shape, generator=generator) < 0.05] = -(2**62)
        parents = torch.randint(-4, nodes + 4, (batch, nodes), generator=generator)
        parents[:, 1::2] = torch.randint(0, nodes, (batch, nodes // 2), generator=generator)  # some valid links
        if trial % 4 == 0:
            parents = parents[0]
        probs = torch.rand((batch, nodes, vocab), generator=generator)
        probs[torch.rand(probs.shape, generator=generator) < 0.1] = math.nan
        probs[torch.rand(probs.shape, generator=generator) < 0.1] = -1.0
        # The target wants the in-range twin of some out-of-range draft tokens.
        logits[..., int(tokens.max()) % vocab] = 30.0
        for temperature, q in ((0.0, None), (0.7, None), (0.7, probs)):
            yield logits, tokens, parents, temperature, q


def logit_stats_cases(generator):
    for vocab in (1, 2, 7, 1000, 5003):
        x = torch.randn((3, vocab), generator=generator) * 3
        x[0, vocab // 2:] = F32_MIN
        x[1] = -1e20
        x[2, : max(vocab - 3, 0)] = -math.inf
        ids = torch.tensor([vocab - 1, 0, vocab - 1])
        yield x, ids


def run(device, backends, trials):
    generator = torch.Generator().manual_seed(0)
    calls = 0
    for backend in backends:
        for logits, tokens, parents, temperature, q in verify_tree_cases(generator, trials):
            out = fusedecode.verify_tree(fresh(logits, device), fresh(tokens, device), fresh(parents, device),
                                         temperature=temperature, draft_probs=None if q is None else fresh(q, device),
                                         seed=5, validate=False, backend=backend)
            emitted = out.output_tokens.cpu()
            vocab = logits.shape[-1]
            assert bool(((emitted >= -1) & (emitted < vocab)).all()), (backend, emitted)
            calls += 1
        for x, ids in logit_stats_cases(generator):
            for topk in (0, 64):
                fusedecode.logit_stats(fresh(x, device), token_ids=fresh(ids, device), topk=topk, temperature=0.3,
                                       backend=backend)
                calls += 1
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck_invalid_inputs: {calls} calls on {device} ({', '.join(backends)}) done", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args(argv)
    candidates = ("cpp",) if args.device == "cpu" else ("cuda", "triton")
    backends = [b for b in candidates if unavailable_reason(b, args.device) is None]
    if not backends:
        print(f"memcheck_invalid_inputs: no native backend for {args.device}", file=sys.stderr)
        return 1
    run(args.device, backends, args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
