"""Small, complete exercise of the GPU kernels for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_check.py
"""

import math
import sys

import torch

import fusedecode
from fusedecode.backends import unavailable_reason


def main():
    torch.manual_seed(0)
    backends = [b for b in ("cuda", "triton") if unavailable_reason(b, "cuda") is None]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, vocab in ((1, 151936), (3, 1001), (600, 777), (5, 7)):
            x = torch.randn(rows, vocab + 3, device="cuda").to(dtype)[:, 3:]  # misaligned rows
            x[0, vocab // 2] = -math.inf
            cases.append(x)
    for backend in backends:
        for x in cases:
            ids = torch.randint(0, x.shape[-1], x.shape[:-1], device="cuda")
            for topk in (0, 17):
                fusedecode.logit_stats(x, token_ids=ids, topk=topk, temperature=0.7, backend=backend)
        # verify_tree: all three modes, misaligned rows, several slices, per-row trees.
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(3, 6, 9001, device="cuda").to(dtype)[:, :, 1:]
            tokens = torch.randint(-1, 9000, (3, 6), device="cuda")
            parents = torch.tensor([[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, 3, 4], [-1, 0, 0, 0, 0, 0]], device="cuda")
            probs = torch.softmax(torch.randn(3, 6, 9000, device="cuda"), -1).to(dtype)
            for temperature, q in ((0.0, None), (0.8, None), (0.8, probs)):
                fusedecode.verify_tree(logits, tokens, parents, temperature=temperature, draft_probs=q, seed=7,
                                       backend=backend)
        torch.cuda.synchronize()
        print(f"{backend}: {len(cases) * 2} logit_stats and 6 verify_tree launches done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
