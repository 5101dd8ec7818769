"""Test helpers: backend parametrisation, comparison against the float64 reference, the goodness-of-fit
check of the sampling tests and the invariants of a verify_tree walk on any input."""

import math

import pytest
import torch

import fusedecode
from fusedecode.backends import unavailable_reason
from fusedecode.ops.logit_stats import float_outputs
from fusedecode.reference import logit_stats_reference

# (device, backend) pairs; CUDA ones carry the `cuda` mark and are skipped without a GPU.
BACKEND_CASES = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cpu", "cpp"), id="cpu-cpp"),
    pytest.param(("cpu", "triton"), id="cpu-triton"),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.cuda),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param(("cuda", "torch"), id="cuda-torch", marks=pytest.mark.cuda),
]

# Every float field of logit_stats' output table, the optional ones included.
FLOAT_FIELDS = float_outputs("token_ids", "topk")
RTOL = 1e-4
ATOL = 1e-5


def require_backend(device, backend):
    """Skip when this install or machine cannot run ``backend`` on ``device`` (no GPU, no
    TRITON_INTERPRET for CPU triton, or an extension built without that backend)."""
    reason = unavailable_reason(backend, device)
    if reason:
        pytest.skip(f"backend/device unavailable here: {reason}")


def float64_reference(logits, *, temperature=1.0, token_ids=None, topk=0):
    """The float64 reference LogitStats of the same (already rounded) logits, on the CPU."""
    temp = temperature.detach().cpu() if isinstance(temperature, torch.Tensor) else temperature
    ids = token_ids.detach().cpu() if token_ids is not None else None
    return logit_stats_reference(logits.detach().cpu(), temp, ids, topk, dtype=torch.float64)


def assert_close_to_reference(actual, logits, *, temperature=1.0, token_ids=None, topk=0, context="",
                              expected=None):
    """Compare a LogitStats with the float64 reference on the same (already rounded) logits
    (``expected``: that reference, when the caller already computed it)."""
    if expected is None:
        expected = float64_reference(logits, temperature=temperature, token_ids=token_ids, topk=topk)
    for field in FLOAT_FIELDS:
        exp = getattr(expected, field)
        act = getattr(actual, field)
        if exp is None:
            assert act is None, f"{field} should be None {context}"
            continue
        # The float32 value of the exact result: beyond the float32 range that is +-inf.
        exp = exp.to(torch.float32).double()
        assert act is not None, f"{field} missing {context}"
        assert act.dtype == torch.float32, f"{field} dtype {act.dtype} {context}"
        assert act.shape == exp.shape, f"{field} shape {tuple(act.shape)} != {tuple(exp.shape)} {context}"
        act = act.detach().cpu().double()
        nan_e, nan_a = torch.isnan(exp), torch.isnan(act)
        assert torch.equal(nan_e, nan_a), f"{field}: NaN rows differ {context}\nexpected {exp}\nactual {act}"
        inf_e, inf_a = torch.isinf(exp), torch.isinf(act)
        assert torch.equal(inf_e, inf_a), f"{field}: inf rows differ {context}"
        assert torch.equal(exp[inf_e], act[inf_a]), f"{field}: inf signs differ {context}"
        ok = ~(nan_e | inf_e)
        err = (act[ok] - exp[ok]).abs()
        tol = torch.clamp(RTOL * exp[ok].abs(), min=ATOL)
        if err.numel():
            worst = int(torch.argmax(err - tol))
            assert bool((err <= tol).all()), (
                f"{field}: max error {err.max().item():.3g} (at {worst}: expected {exp[ok][worst].item()!r}, "
                f"got {act[ok][worst].item()!r}) {context}")
    assert actual.argmax.dtype == torch.int64
    assert torch.equal(actual.argmax.cpu(), expected.argmax), (
        f"argmax differs {context}\nexpected {expected.argmax}\nactual {actual.argmax.cpu()}")


def run_and_check(logits, backend, **kwargs):
    stats = fusedecode.logit_stats(logits, backend=backend, **kwargs)
    context = f"[backend={backend} shape={tuple(logits.shape)} dtype={logits.dtype} kwargs={sorted(kwargs)}]"
    assert_close_to_reference(stats, logits, context=context, **kwargs)
    return stats


def random_logits(shape, generator, dtype=torch.float32, scale=3.0, offset=0.0, device="cpu"):
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(device)


def poison(logits, row, kind):
    """Put NaN, +inf or mask everything in one row (last dim)."""
    value = {"nan": math.nan, "inf": math.inf}.get(kind)
    if kind == "all_masked":
        logits[row] = -math.inf
    else:
        logits[row, logits.shape[-1] // 2] = value
    return logits


def interpreted(target):
    """The Triton interpreter runs every program in Python: statistical tests use fewer trees there
    (weaker, still valid); compiled backends get the full sample."""
    return tuple(target) == ("cpu", "triton")


def chi_square_pvalue(counts, expected_probs):
    """Pearson's chi-square p-value of ``counts`` against ``expected_probs``, small cells pooled (the
    unpowered sampling checks; the powered ones use tests/support/distribution.py)."""
    counts = counts.double()
    total = counts.sum()
    expected = expected_probs.double() * total
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples of zero-probability outcomes"
    # Pool small cells so the chi-square approximation holds.
    order = torch.argsort(expected[keep])
    exp_sorted, obs_sorted = expected[keep][order], counts[keep][order]
    pooled_e, pooled_o, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(exp_sorted.tolist(), obs_sorted.tolist()):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 5:
            pooled_e.append(acc_e)
            pooled_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0 and pooled_e:
        pooled_e[-1] += acc_e
        pooled_o[-1] += acc_o
    e, o = torch.tensor(pooled_e), torch.tensor(pooled_o)
    stat = float(((o - e) ** 2 / e).sum())
    dof = max(len(pooled_e) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def reachable(parents_row):
    """The walk's rule for an invalid tree: node c is a child of r only when parents[c] == r < c, so
    a node with an out-of-range or later parent is unreachable, and so is everything below it."""
    nodes = len(parents_row)
    ok = [False] * nodes
    ok[0] = True
    for c in range(1, nodes):
        p = int(parents_row[c])
        ok[c] = 0 <= p < c and ok[p]
    return ok


def check_walk_invariants(out, logits, tokens, parents, draft_tokens_valid_range=None):
    """What verify_tree guarantees for any input, valid or not."""
    batch, nodes, vocab = logits.shape
    parents = parents.cpu().to(torch.int64).expand(batch, nodes)
    tokens = tokens.cpu()
    num, accepted, emitted = out.num_accepted.cpu(), out.accepted_nodes.cpu(), out.output_tokens.cpu()
    width = accepted.shape[1]
    assert emitted.shape == (batch, width) and num.shape == (batch,)
    row_valid = out.stats.argmax.cpu() >= 0
    for b in range(batch):
        count = int(num[b])
        assert 0 <= count < width
        path = accepted[b, :count + 1].tolist()
        assert path[0] == 0
        assert (accepted[b, count + 1:] == -1).all() and (emitted[b, count + 1:] == -1).all()
        for i in range(count):
            parent, child = path[i], path[i + 1]
            assert parent < child < nodes and int(parents[b, child]) == parent, (b, path)
            token = int(tokens[b, child])
            assert 0 <= token < vocab, f"row {b}: accepted token {token} outside [0, {vocab})"
            assert int(emitted[b, i]) == token
        last = int(emitted[b, count])
        if row_valid[b, path[-1]]:
            assert 0 <= last < vocab, f"row {b}: emitted {last}"
        else:
            assert last == -1
