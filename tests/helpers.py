"""Test helpers: backend parametrisation and comparison against the float64 reference."""

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
