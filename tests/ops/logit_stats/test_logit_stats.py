"""logit_stats on every backend against the float64 torch reference (docs/semantics.md#logit_stats)."""

import math
import warnings

import pytest
import torch

import fusedecode
from helpers import FLOAT_FIELDS, poison, random_logits, run_and_check

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1), (4, 100), (2, 3, 1000), (5, 4099), (3, 32000), (2, 151936)])
def test_random_shapes(target, shape, dtype, generator):
    device, backend = target
    logits = random_logits(shape, generator, dtype, device=device)
    run_and_check(logits, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_large_vocab_few_rows(target, dtype, generator):
    # One and two rows of V = 256k: the split-vocab paths of every fused backend.
    device, backend = target
    for rows in (1, 2):
        run_and_check(random_logits((rows, 256000), generator, dtype, device=device), backend, topk=8)


@pytest.mark.parametrize("scale,offset", [(0.01, 0.0), (1.0, 0.0), (8.0, 0.0), (30.0, 0.0), (2.0, 40.0), (2.0, -40.0)])
def test_value_ranges(target, scale, offset, generator):
    device, backend = target
    logits = random_logits((6, 5000), generator, scale=scale, offset=offset, device=device)
    run_and_check(logits, backend, topk=5)


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 2.5])
def test_scalar_temperature(target, temperature, generator):
    device, backend = target
    logits = random_logits((4, 3000), generator, device=device)
    run_and_check(logits, backend, temperature=temperature, topk=3)


def test_per_row_temperature(target, generator):
    device, backend = target
    logits = random_logits((2, 3, 2000), generator, dtype=torch.bfloat16, device=device)
    temperature = (torch.rand((2, 3), generator=generator) * 2 + 0.1).to(device)
    run_and_check(logits, backend, temperature=temperature, topk=4)


def test_masked_entries(target, generator):
    device, backend = target
    logits = random_logits((6, 3001), generator, device=device)
    keep = torch.rand((6, 3001), generator=generator) < 0.3
    logits = torch.where(keep.to(device), logits, torch.full_like(logits, -math.inf))
    logits[1, :] = -math.inf
    logits[1, 5] = 2.0  # a single finite entry: entropy 0
    logits[2, 100:] = -math.inf  # top-k style: only the first 100 survive
    token_ids = torch.randint(0, 3001, (6,), generator=generator).to(device)
    stats = run_and_check(logits, backend, token_ids=token_ids, topk=64)
    assert stats.entropy[1].item() == pytest.approx(0.0, abs=1e-6)
    assert stats.argmax[1].item() == 5


def test_token_on_masked_entry_is_minus_inf(target, generator):
    device, backend = target
    logits = random_logits((2, 500), generator, device=device)
    logits[:, 7] = -math.inf
    stats = run_and_check(logits, backend, token_ids=torch.tensor([7, 8], device=device))
    assert stats.token_logprob[0].item() == -math.inf
    assert math.isfinite(stats.token_logprob[1].item())


@pytest.mark.parametrize("kind", ["nan", "inf", "all_masked"])
def test_bad_rows_give_nan_and_leave_others_alone(target, kind, generator):
    device, backend = target
    logits = random_logits((4, 2500), generator, device=device)
    poison(logits, 2, kind)
    stats = run_and_check(logits, backend, token_ids=torch.tensor([0, 1, 2, 3], device=device), topk=5)
    assert stats.argmax[2].item() == -1
    assert all(math.isnan(getattr(stats, f)[2].item()) for f in ("logsumexp", "entropy", "topk_confidence"))
    assert stats.argmax[[0, 1, 3]].ge(0).all()


@pytest.mark.parametrize("rows,vocab", [(1, 200000), (3, 70000)])
def test_nan_in_split_rows(target, rows, vocab, generator):
    device, backend = target
    logits = random_logits((rows, vocab), generator, device=device)
    logits[0, vocab - 3] = math.nan
    run_and_check(logits, backend, topk=2)


def test_ties_go_to_lowest_index(target, generator):
    device, backend = target
    vocab = 40000
    logits = random_logits((4, vocab), generator, device=device)
    logits[0] = 1.5  # all equal
    logits[1, [123, 30000, 39999]] = 50.0
    logits[2, [vocab - 1]] = 50.0
    logits[3, :] = -math.inf
    logits[3, [17, 35000]] = 0.0
    stats = run_and_check(logits, backend, topk=3)
    assert stats.argmax.tolist() == [0, 123, vocab - 1, 17]


def test_uniform_and_spike_numerics(target, generator):
    # Near-uniform rows with one spike: varentropy is small while E[d]^2 is not (cancellation risk).
    device, backend = target
    logits = torch.zeros((4, 152000), device=device)
    logits += random_logits((4, 152000), generator, scale=1e-3, device=device)
    logits[0, 5] = 5.0
    logits[1, 77777] = 8.0
    logits[2, 100] = 3.0
    run_and_check(logits, backend, topk=16)


@pytest.mark.parametrize("topk", [1, 2, 5, 20, 63, 64])
def test_topk_confidence_for_each_k_and_rows_shorter_than_k(target, topk, generator):
    device, backend = target
    logits = random_logits((3, 9000), generator, dtype=torch.bfloat16, device=device)
    logits[1, 10:] = -math.inf  # k > n uses n
    run_and_check(logits, backend, topk=topk)


def test_topk_ascending_rows(target):
    # Sorted rows push every element through the running top-k (worst case for filtered top-k).
    device, backend = target
    logits = torch.linspace(-10, 10, 20000, device=device).repeat(2, 1)
    logits[1] = logits[1].flip(0)
    run_and_check(logits, backend, topk=64)


def test_non_contiguous_views(target, generator):
    device, backend = target
    base = random_logits((4, 6, 1030), generator, device=device)
    run_and_check(base[:, ::2, :], backend, topk=2)          # strided middle dim
    run_and_check(base.transpose(0, 1), backend)              # [T, B, V] from [B, T, V]
    run_and_check(base[..., 3:1027], backend, topk=2)         # last dim starts off a 16-byte boundary
    run_and_check(base[:, -1, :], backend)                    # the last position of every sequence
    four_d = random_logits((2, 3, 4, 257), generator, device=device).permute(2, 0, 1, 3)
    run_and_check(four_d, backend)                            # needs a copy: three stride groups
    half = random_logits((5, 1001), generator, dtype=torch.float16, device=device)
    run_and_check(half[1:], backend)                          # odd row stride


def test_shapes_of_outputs(target, generator):
    device, backend = target
    logits = random_logits((2, 3, 50), generator, device=device)
    stats = fusedecode.logit_stats(logits, backend=backend, token_ids=torch.zeros((2, 3), dtype=torch.int32,
                                                                                  device=device), topk=2)
    for field in stats:
        assert field.shape == (2, 3)
        assert field.device.type == torch.device(device).type
    stats = fusedecode.logit_stats(logits, backend=backend)
    assert stats.token_logprob is None and stats.topk_confidence is None


def test_zero_rows_give_empty_fields(target):
    device, backend = target
    stats = fusedecode.logit_stats(torch.zeros((0, 10), device=device), backend=backend, topk=3)
    assert stats.entropy.shape == (0,) and stats.topk_confidence.shape == (0,)


def test_same_logits_give_bitwise_equal_results(target, generator):
    device, backend = target
    logits = random_logits((3, 70000), generator, dtype=torch.bfloat16, device=device)
    first = fusedecode.logit_stats(logits, backend=backend, topk=7)
    second = fusedecode.logit_stats(logits, backend=backend, topk=7)
    assert first.token_logprob is None and second.token_logprob is None
    for name, a, b in zip(first._fields, first, second):  # every output, a new one included
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------
# Gradients: every backend's backward is reference.logit_stats_backward (autograd of the reference)

FIELD_WEIGHTS = range(1, len(FLOAT_FIELDS) + 1)  # a different weight for each float field


def _weighted_sum(stats, weights):
    """A scalar that depends on every float field (each with its own weight), NaN rows left out."""
    return sum(getattr(stats, name).nan_to_num(0.0, 0.0, 0.0).sum() * weight for name, weight in zip(FLOAT_FIELDS, weights))


def _gradient_case(generator, dtype=torch.float32):
    """Rows without ties (a kink of argmax/top-k), one masked entry, one NaN row."""
    logits = (torch.randn((4, 9), generator=generator, dtype=torch.float64) * 2).to(dtype)
    logits[1, 3] = -math.inf
    logits[3, 5] = math.nan
    temperature = torch.tensor([0.7, 1.3, 2.0, 1.0], dtype=dtype)
    token_ids = torch.tensor([1, 2, 8, 0])
    return logits, temperature, token_ids


def test_gradcheck_float64_torch_path(generator):
    """The torch path's autograd Function, run in float64, against finite differences (rows with no
    NaN: gradcheck needs a differentiable function), for the logits and a per-row temperature."""
    from fusedecode.ops.logit_stats.op import _TorchBackendWithGrad

    logits, temperature, token_ids = _gradient_case(generator, torch.float64)
    logits, temperature, token_ids = logits[:3], temperature[:3], token_ids[:3]
    logits[1, 3] = 0.3  # gradcheck perturbs every entry: no -inf here (masked entries: the next test)
    for topk in (0, 3):
        def stats(x, t):
            out = _TorchBackendWithGrad.apply(x, t, token_ids, topk, torch.float64)
            return tuple(value for value in out if value is not None and value.dtype == torch.float64)

        assert torch.autograd.gradcheck(stats, (logits.clone().requires_grad_(), temperature.clone().requires_grad_()))
        scalar = lambda x: stats(x, 0.8)  # noqa: E731
        assert torch.autograd.gradcheck(scalar, (logits.clone().requires_grad_(),))


def test_gradient_of_masked_entries_and_nan_rows(generator):
    """Masked (-inf) entries get 0 (their probability stays 0), every entry of a NaN row gets NaN,
    the other rows are unaffected by either."""
    logits, temperature, token_ids = _gradient_case(generator)
    x = logits.clone().requires_grad_()
    t = temperature.clone().requires_grad_()
    _weighted_sum(fusedecode.logit_stats(x, temperature=t, token_ids=token_ids, topk=3, backend="torch"),
                  FIELD_WEIGHTS).backward()
    assert x.grad[1, 3] == 0 and torch.isfinite(x.grad[:3]).all() and torch.isfinite(t.grad[:3]).all()
    assert torch.isnan(x.grad[3]).all() and torch.isnan(t.grad[3])
    clean = logits[:3].clone().requires_grad_()
    _weighted_sum(fusedecode.logit_stats(clean, temperature=temperature[:3], token_ids=token_ids[:3], topk=3,
                                         backend="torch"), FIELD_WEIGHTS).backward()
    assert torch.equal(clean.grad, x.grad[:3])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gradients_match_the_torch_path(target, dtype, generator):
    """Every backend (the fused ones are custom ops with a registered backward) gives the torch
    path's gradients, for the logits and a per-row temperature, with no 'autograd kernel was not
    registered' warning."""
    device, backend = target
    logits, temperature, token_ids = _gradient_case(generator, dtype)
    results = []
    for name in ("torch", backend):
        x = logits.to(device).clone().requires_grad_()
        t = temperature.to(device).clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            stats = fusedecode.logit_stats(x, temperature=t, token_ids=token_ids.to(device), topk=3, backend=name)
            assert stats.entropy.grad_fn is not None and "WarnNotImplemented" not in type(stats.entropy.grad_fn).__name__
            _weighted_sum(stats, FIELD_WEIGHTS).backward()
        assert x.grad.dtype == dtype and t.grad.dtype == dtype
        results.append((x.grad.float().cpu().clone(), t.grad.float().cpu().clone()))
    (x_ref, t_ref), (x_got, t_got) = results
    torch.testing.assert_close(x_got, x_ref, equal_nan=True)
    torch.testing.assert_close(t_got, t_ref, equal_nan=True)


def test_gradients_of_strided_and_batched_logits(target, generator):
    """The fused ops see [..., V] as a strided [outer, inner, V] view: the gradient lands on the
    caller's tensor, in its own layout, for a 3-D non-contiguous input and a scalar temperature."""
    device, backend = target
    base = torch.randn((3, 5, 40), generator=generator).to(device)
    grads = []
    for name in ("torch", backend):
        x = base.clone().requires_grad_()
        view = x.transpose(0, 1)[:, 1:]  # [5, 2, 40]: rows neither contiguous nor in memory order
        stats = fusedecode.logit_stats(view, temperature=0.9, topk=2, backend=name)
        (stats.entropy.sum() + 2 * stats.topk_confidence.sum() + 3 * stats.logsumexp.sum()).backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[0][0] == 0).all()  # the rows the view leaves out get no gradient


def test_no_gradient_when_nothing_asks_for_one(target, generator):
    device, backend = target
    x = torch.randn((2, 10), generator=generator).to(device).requires_grad_()
    with torch.no_grad():
        assert fusedecode.logit_stats(x, backend=backend).entropy.grad_fn is None
    assert fusedecode.logit_stats(x.detach(), backend=backend).entropy.grad_fn is None
    assert fusedecode.logit_stats(x, backend=backend).argmax.requires_grad is False
