"""linear_cross_entropy_entropy (chunked lm_head + CE + last-row entropy) against the naive float64
reference that materialises the [T, V] logits: losses and the gradients of hidden, weight and delta."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedecode
from fusedecode.backends import unavailable_reason
from fusedecode.ops.linear_ce import default_chunk
from fusedecode.reference import linear_cross_entropy_entropy_reference
from helpers import require_backend

try:  # a kernel around the Triton tanh helper (module level: jit functions resolve names as globals)
    import triton
    import triton.language as tl

    from fusedecode.triton_kernels.head_transform import tanh_and_derivative

    @triton.jit
    def _tanh_kernel(u_ptr, t_ptr, d_ptr, n, BLOCK: tl.constexpr):
        index = tl.arange(0, BLOCK)
        u = tl.load(u_ptr + index, mask=index < n)
        t, d = tanh_and_derivative(u)
        tl.store(t_ptr + index, t, mask=index < n)
        tl.store(d_ptr + index, d, mask=index < n)
except ImportError:
    _tanh_kernel = None

CPU_BACKENDS = ["torch", "triton"]
# The Triton interpreter evaluates padding lanes (-inf * 0) before masking them out.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")
IGNORE = -100


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    require_backend("cpu", request.param)
    return request.param


def forward_op(backend):
    """The forward custom op of ``backend`` (one op per backend, as for every op)."""
    return getattr(torch.ops.fusedecode, "linear_ce_forward" + ("_triton" if backend == "triton" else ""))


def weight_grad_op(backend):
    return getattr(torch.ops.fusedecode, "linear_ce_weight_grad" + ("_triton" if backend == "triton" else ""))


def randint(generator, low, high):
    return int(torch.randint(low, high + 1, (), generator=generator))


def make_inputs(generator, *, batch=None, tokens, width, vocab, dtype=torch.float32, delta="none",
                ignored_fraction=0.3, device="cpu"):
    """Random hidden/weight/targets/delta, all leaves that require grad. ``delta`` is "none",
    "shared" ([H], float32) or "per_batch" ([B, H], hidden's dtype)."""
    lead = (tokens,) if batch is None else (batch, tokens)
    hidden = torch.randn(lead + (width,), generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn((vocab, width), generator=generator, dtype=torch.float64) / math.sqrt(width) * 3).to(dtype)
    targets = torch.randint(0, vocab, lead, generator=generator)
    targets[torch.rand(lead, generator=generator) < ignored_fraction] = IGNORE
    if delta == "none":
        delta_t = None
    elif delta == "shared":
        delta_t = torch.randn((width,), generator=generator) * 0.5
    else:
        delta_t = (torch.randn((batch, width), generator=generator, dtype=torch.float64) * 0.5).to(dtype)
    leaves = [hidden, weight] + ([delta_t] if delta_t is not None else [])
    for leaf in leaves:
        leaf.requires_grad_(True)
    moved = [t.to(device).detach().requires_grad_(t.requires_grad) if t is not None else None
             for t in (hidden, weight, targets, delta_t)]
    return moved


def losses_and_grads(fn, hidden, weight, targets, delta, upstream_ce, upstream_entropy, **kwargs):
    ce, entropy = fn(hidden, weight, targets, delta=delta, **kwargs)
    inputs = [t for t in (hidden, weight, delta) if t is not None and t.requires_grad]
    total = (upstream_ce * ce + upstream_entropy * entropy).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=False) if inputs else []
    return ce, entropy, grads


def reference(hidden, weight, targets, *, delta=None, temperature=1.0, ignore_index=IGNORE):
    """The float64 oracle on the same (already rounded) inputs, with gradients for the same leaves."""
    def as64(t):
        return t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None

    return linear_cross_entropy_entropy_reference(as64(hidden), as64(weight), targets.cpu(), as64(delta),
                                                  temperature, ignore_index)


# A float32 log-sum-exp of a near-certain row is log(1 + r) with 1 + r rounded: about 6e-8 absolute
# error however small the loss, so losses are also allowed a small absolute error (logit_stats
# promises 1e-4 relative or 1e-5 absolute; 1e-6 here).
LOSS_ABSOLUTE = 1e-6


def assert_close(actual, expected, what, rtol, atol, absolute=0.0):
    """Elementwise |a - e| <= atol * max|e| + rtol * |e| + absolute (atol relative to the tensor's
    scale, since gradient entries near 0 carry absolute, not relative, rounding error)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-30) if expected.numel() else 1.0
    err = (actual - expected).abs()
    tol = atol * scale + rtol * expected.abs() + absolute
    assert bool((err <= tol).all()), f"{what}: max error {err.max().item():.3g} (scale {float(scale):.3g})"


def check_against_reference(backend, hidden, weight, targets, delta=None, *, generator, temperature=1.0,
                            chunk=None, rtol=1e-4, atol=2e-5, upstream=None, bias=None, logit_scale=None,
                            softcap=None):
    """Losses and the gradients of every leaf that requires grad (hidden, weight, delta, bias) against
    the float64 reference on the same inputs, under a random upstream mix of ce and entropy."""
    batched = hidden.dim() == 3
    shape = (hidden.shape[0],) if batched else ()
    if upstream is None:
        upstream = (torch.rand(shape, generator=generator, dtype=torch.float64) * 4 - 2,
                    torch.rand(shape, generator=generator, dtype=torch.float64) * 4 - 2)
    a, b = upstream
    leaves = [t for t in (hidden, weight, delta, bias) if t is not None and t.requires_grad]
    ce, entropy = fusedecode.linear_cross_entropy_entropy(
        hidden, weight, targets, delta=delta, bias=bias, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, chunk=chunk, backend=backend)
    total = (a.to(hidden.device).float() * ce + b.to(hidden.device).float() * entropy).sum()
    grads = torch.autograd.grad(total, leaves) if leaves else []
    assert ce.dtype == entropy.dtype == torch.float32 and ce.shape == entropy.shape == shape
    ref_leaves = [t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (hidden, weight, delta, bias)]
    ref_ce, ref_entropy = linear_cross_entropy_entropy_reference(
        ref_leaves[0], ref_leaves[1], targets.cpu(), ref_leaves[2], temperature, IGNORE, bias=ref_leaves[3],
        logit_scale=logit_scale, softcap=softcap)
    ref_inputs = [t for t in ref_leaves if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad((a * ref_ce + b * ref_entropy).sum(), ref_inputs)
    assert_close(ce, ref_ce, "ce", rtol, atol, LOSS_ABSOLUTE)
    assert_close(entropy, ref_entropy, "entropy", rtol, atol, LOSS_ABSOLUTE)
    names = [n for n, t in zip(("hidden", "weight", "delta", "bias"), (hidden, weight, delta, bias))
             if t is not None and t.requires_grad]
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, leaves):
        assert grad.dtype == leaf.dtype, f"grad of {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_close(grad, ref_grad, f"grad of {name}", rtol, atol)
    return ce, entropy


# ------------------------------------------------------------------------------------------------
# Against the reference: shapes, chunking, ignored rows, delta, temperature, upstream mixes

CASES = ["T=1", "chunk=1", "several_chunks", "default_chunk", "all_ignored", "last_row_ignored", "unbatched_delta",
         "batched", "batched_shared_delta", "batched_per_batch_delta", "temperature"]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, generator):
    batched = case.startswith("batched")
    tokens = 1 if case == "T=1" else randint(generator, 2, 9)
    vocab = randint(generator, 50, 700)
    if vocab % 64 == 0:
        vocab += 1  # never a multiple of the Triton block nor of the chunk
    width = randint(generator, 4, 40)
    delta = {"unbatched_delta": "shared", "batched_shared_delta": "shared",
             "batched_per_batch_delta": "per_batch", "temperature": "shared"}.get(case, "none")
    hidden, weight, targets, delta_t = make_inputs(
        generator, batch=randint(generator, 2, 3) if batched else None, tokens=tokens, width=width, vocab=vocab,
        delta=delta, ignored_fraction=1.0 if case == "all_ignored" else 0.3)
    if case == "last_row_ignored":
        targets[..., -1] = IGNORE
    chunk = {"chunk=1": 1, "several_chunks": randint(generator, 2, max(2, tokens - 1)),
             "default_chunk": None}.get(case, randint(generator, 1, tokens))
    temperature = float(torch.rand((), generator=generator) * 2 + 0.3) if case == "temperature" else 1.0
    ce, _ = check_against_reference(backend, hidden, weight, targets, delta_t, generator=generator,
                                    temperature=temperature, chunk=chunk)
    if case == "all_ignored":
        assert torch.equal(ce, torch.zeros_like(ce))


@pytest.mark.parametrize("upstream", [(1.0, 0.0), (0.0, 1.0), (0.95, 0.05)], ids=["ce_only", "entropy_only", "srgen"])
def test_upstream_mixes(backend, upstream, generator):
    batch = 2
    hidden, weight, targets, delta = make_inputs(generator, batch=batch, tokens=5, width=12, vocab=301,
                                                 delta="per_batch")
    a, b = (torch.full((batch,), value, dtype=torch.float64) for value in upstream)
    check_against_reference(backend, hidden, weight, targets, delta, generator=generator, chunk=2, upstream=(a, b))


def test_many_blocks_per_row(generator, monkeypatch):
    """A block much smaller than V: the online max/sum rescaling across blocks."""
    require_backend("cpu", "triton")
    from fusedecode.triton_kernels import linear_ce as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 32)
    hidden, weight, targets, delta = make_inputs(generator, tokens=4, width=8, vocab=333, delta="shared")
    weight.data[:, :] *= 4  # wide logits: the running max moves between blocks
    check_against_reference("triton", hidden, weight, targets, delta, generator=generator, chunk=3,
                            temperature=0.7)


# ------------------------------------------------------------------------------------------------
# Head transforms: lm_head bias, logit scale, final soft-capping (and their gradients)

TRANSFORMS = {
    "bias": dict(bias=True),
    "scale": dict(logit_scale=0.37),
    "negative_scale": dict(logit_scale=-1.3),
    "softcap": dict(softcap=2.5),
    "saturating_softcap": dict(softcap=0.3),  # most logits deep in tanh's flat tails
    "scale_softcap": dict(logit_scale=2.0, softcap=4.0),
    "all": dict(bias=True, logit_scale=0.8, softcap=3.0),
}


def transform_kwargs(name, generator, vocab, dtype=torch.float32):
    kwargs = dict(TRANSFORMS[name])
    if kwargs.pop("bias", False):
        kwargs["bias"] = (torch.randn(vocab, generator=generator, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    return kwargs


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("layout", ["unbatched", "batched_per_batch_delta", "batched_shared_delta_no_hidden_grad"])
def test_head_transforms_match_reference(backend, transform, layout, generator):
    """Every transform, alone and combined, in the order bias -> scale -> soft-cap, with the
    gradients of hidden, weight, delta and bias; ignored rows, several chunks, a temperature."""
    vocab = randint(generator, 60, 400) | 1
    batch = None if layout == "unbatched" else 3
    delta = {"unbatched": "shared", "batched_per_batch_delta": "per_batch"}.get(layout, "shared")
    hidden, weight, targets, delta_t = make_inputs(generator, batch=batch, tokens=randint(generator, 2, 7),
                                                   width=randint(generator, 4, 24), vocab=vocab, delta=delta)
    if layout.endswith("no_hidden_grad"):  # SRGen's case: only delta (and the bias) need a gradient
        hidden, weight = hidden.detach(), weight.detach()
    temperature = float(torch.rand((), generator=generator) + 0.5)
    # Deep in tanh's flat tails the slope 1 - (y / softcap)^2 is a difference of numbers near 1:
    # its float32 value carries ~1e-7 absolute error, large next to the tiny slope, so the gradients
    # there are only good to a few 1e-5 of their (small) scale (about 1 in 10 seeds exceeded 2e-5).
    atol = 1e-4 if transform == "saturating_softcap" else 2e-5
    check_against_reference(backend, hidden, weight, targets, delta_t, generator=generator, chunk=2, atol=atol,
                            temperature=temperature, **transform_kwargs(transform, generator, vocab))


@pytest.mark.parametrize("transform", ["negative_scale", "saturating_softcap", "all"])
def test_head_transforms_many_blocks_per_row(transform, generator, monkeypatch):
    """Padding lanes of the last block must stay out of every sum after the transform (a negative
    scale or the soft-cap would turn their -inf into +inf or a finite -softcap)."""
    require_backend("cpu", "triton")
    from fusedecode.triton_kernels import linear_ce as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 32)
    vocab = 333  # ten full blocks and a last one of 13 real lanes
    hidden, weight, targets, delta = make_inputs(generator, tokens=4, width=8, vocab=vocab, delta="shared")
    check_against_reference("triton", hidden, weight, targets, delta, generator=generator, chunk=3, temperature=0.7,
                            **transform_kwargs(transform, generator, vocab))


def test_triton_tanh_is_accurate_everywhere():
    """The kernel's tanh and 1 - tanh^2 (built from exp, with a series near 0) against float64."""
    require_backend("cpu", "triton")
    magnitudes = torch.cat([torch.logspace(-30, 2, 400), torch.linspace(0.3, 0.45, 151), torch.tensor([0.375])])
    u = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, math.inf, -math.inf, math.nan])]).float()
    t, d = torch.empty_like(u), torch.empty_like(u)
    _tanh_kernel[(1,)](u, t, d, u.numel(), BLOCK=2048)
    exact = torch.tanh(u.double())
    finite = u.isfinite()
    relative = ((t.double() - exact).abs() / exact.abs().clamp_min(1e-300))[finite & (u != 0)]
    assert relative.max() < 2e-7, relative.max()
    assert t[u == 0].item() == 0.0 and t[u == math.inf].item() == 1.0 and t[u == -math.inf].item() == -1.0
    assert math.isnan(t[u.isnan()].item()) and math.isnan(d[u.isnan()].item())
    tail = torch.exp(-2 * u.double().abs())[finite]  # 1 - tanh^2 without cancellation, in float64
    exact_slope = 4 * tail / (1 + tail) ** 2
    assert ((d[finite].double() - exact_slope).abs() <= 4e-7 * exact_slope + 1e-37).all()  # 1e-37: float32 underflow
    assert d[u.isinf()].eq(0).all()


def test_head_transform_without_delta_or_weight_grad(backend, generator):
    """Only the bias requires grad: its gradient comes from the row sums alone."""
    hidden, weight, targets, _ = make_inputs(generator, batch=2, tokens=5, width=8, vocab=97)
    kwargs = transform_kwargs("all", generator, 97)
    check_against_reference(backend, hidden.detach(), weight.detach(), targets, None, generator=generator, chunk=2,
                            **kwargs)


def test_softcap_matches_the_model_formula_bit_for_bit(generator):
    """The torch path applies the transform with the models' own operations and order
    ((z * scale) / cap, tanh, * cap), so a float32 model's logits come out identical."""
    from fusedecode.head_transform import apply_head_transform

    z = torch.randn(6, 50, generator=generator) * 20
    model = torch.tanh((z * 0.4) / 3.0) * 3.0
    assert torch.equal(apply_head_transform(z.clone(), 0.4, 3.0), model)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_half_precision_loss_and_gradients_match_reference(backend, dtype, rtol, generator):
    # The chunk logits are float32 sums of exact products (the shared tiled head; before it, CPU
    # logits rounded to float16, ~4e-3 at |z| ~ 10, failed rtol 3e-3 for ~1 seed in 25). What is
    # left: the logit gradient cast to the input dtype before its matmuls (as Liger-Kernel does) and
    # the returned gradient in the input dtype, a few ulps (float16: 2^-11 relative).
    hidden, weight, targets, delta = make_inputs(generator, batch=2, tokens=6, width=32, vocab=257, dtype=dtype,
                                                 delta="per_batch")
    check_against_reference(backend, hidden, weight, targets, delta, generator=generator, chunk=4, rtol=rtol,
                            atol=rtol)


def test_float64_torch_backend(generator):
    hidden, weight, targets, delta = make_inputs(generator, tokens=5, width=8, vocab=97, dtype=torch.float64,
                                                 delta="shared")
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, chunk=2,
                                                          backend="torch")
    ref_ce, ref_entropy = reference(hidden, weight, targets, delta=delta)
    assert ce.dtype == torch.float64
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12)


def test_only_requested_gradients_are_computed(backend, generator):
    """SRGen's case: only delta requires grad. No [B, T, H] or [V, H] gradient is produced."""
    hidden, weight, targets, delta = make_inputs(generator, batch=1, tokens=6, width=10, vocab=120,
                                                 delta="per_batch")
    hidden, weight = hidden.detach(), weight.detach()
    outputs = forward_op(backend)(hidden, weight, targets, delta, None, None, None, 1.0, IGNORE, 4,
                                  False, True, False, False)
    grad_hidden_ce, grad_delta_ce, grad_weight_ce, grad_bias_ce = outputs[3:7]
    assert grad_hidden_ce.numel() == 0 and grad_weight_ce.numel() == 0 and grad_bias_ce.numel() == 0
    assert grad_delta_ce.shape == (1, 10)
    check_against_reference(backend, hidden, weight, targets, delta, generator=generator, chunk=4)

    with torch.no_grad():
        outputs = forward_op(backend)(hidden, weight, targets, delta, None, None, None, 1.0, IGNORE,
                                      4, False, False, False, False)
    assert all(t.numel() == 0 for t in outputs[3:7]) and outputs[8].numel() == 0


def test_no_tensor_of_size_t_times_v(generator):
    """Every tensor the torch backend creates (forward and backward, all three gradients) is smaller
    than the [T, V] logits: chunk * V and [V, H] at most."""
    tokens, width, vocab, chunk = 64, 8, 500, 4
    hidden, weight, targets, delta = make_inputs(generator, batch=2, tokens=tokens, width=width, vocab=vocab,
                                                 delta="per_batch")

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    with LargestTensor():
        ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, chunk=chunk,
                                                              backend="torch")
        (ce.sum() + entropy.sum()).backward()
    assert LargestTensor.largest <= max(chunk * vocab, vocab * width, 2 * tokens * width), LargestTensor.largest
    assert LargestTensor.largest < tokens * vocab


def test_default_chunk_size():
    for vocab in (32000, 151936, 256000):
        chunk_bytes = default_chunk(vocab) * vocab * 4
        assert 32 << 20 <= chunk_bytes <= 64 << 20, (vocab, chunk_bytes)
    assert default_chunk(10**9) == 1


# ------------------------------------------------------------------------------------------------
# NaN, backends, validation


def test_nan_propagates(backend, generator):
    hidden, weight, targets, _ = make_inputs(generator, tokens=5, width=8, vocab=90, ignored_fraction=0.0)
    hidden = hidden.detach().clone()
    hidden[1, 3] = math.nan  # a counted row that is not the last one
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight.detach(), targets, chunk=2, backend=backend)
    assert math.isnan(ce.item()) and math.isfinite(entropy.item())

    hidden[1, 3] = 0.0
    hidden[-1, 0] = math.nan
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight.detach(), targets, chunk=2, backend=backend)
    assert math.isnan(ce.item()) and math.isnan(entropy.item())

    delta = torch.zeros(8)
    delta[2] = math.nan
    hidden[-1, 0] = 0.0
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight.detach(), targets, delta=delta,
                                                          backend=backend)
    assert math.isnan(ce.item()) and math.isnan(entropy.item())


@pytest.mark.parametrize("batch", [1, 3])
def test_nan_in_an_ignored_row_stays_out_of_every_gradient(backend, batch, generator):
    """Padding rows may hold anything: their targets are ignored, so no gradient may see them."""
    hidden = torch.randn(batch, 7, 8, generator=generator)
    hidden[batch // 2, 3, 0] = math.nan
    hidden.requires_grad_()
    weight = (torch.randn(50, 8, generator=generator) / 3).requires_grad_()
    delta = (0.3 * torch.randn(batch, 8, generator=generator)).requires_grad_()
    targets = torch.randint(0, 50, (batch, 7), generator=generator)
    targets[batch // 2, 3] = -100
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, chunk=2,
                                                          backend=backend)
    (ce.sum() + 0.5 * entropy.sum()).backward()
    assert torch.isfinite(ce).all() and torch.isfinite(entropy).all()
    for name, grad in (("weight", weight.grad), ("delta", delta.grad)):
        assert torch.isfinite(grad).all(), name
    finite_rows = torch.ones(batch, 7, dtype=torch.bool)
    finite_rows[batch // 2, 3] = False
    assert torch.isfinite(hidden.grad[finite_rows]).all()


def test_out_of_range_target_without_validation_gives_nan(backend, generator):
    """On a GPU the range is not checked (it would synchronise): the op itself must give NaN."""
    hidden, weight, targets, _ = make_inputs(generator, batch=2, tokens=3, width=8, vocab=40, ignored_fraction=0.0)
    targets[0, 1] = 40
    outputs = forward_op(backend)(hidden.detach(), weight.detach(), targets, None, None, None, None,
                                  1.0, IGNORE, 2, True, False, False, False)
    ce, grad_hidden = outputs[0], outputs[3]
    assert math.isnan(ce[0].item()) and math.isfinite(ce[1].item())
    assert bool(grad_hidden[0, 1].isnan().all()) and bool(grad_hidden[1].isfinite().all())


# ids without the word "cuda": conftest skips tests carrying that keyword on machines without a GPU.
@pytest.mark.parametrize("name", ["cpp", "cuda"], ids=["named-cpp", "named-native-gpu"])
def test_unimplemented_backends(name, generator, monkeypatch):
    hidden, weight, targets, _ = make_inputs(generator, tokens=2, width=4, vocab=10)
    with pytest.raises(RuntimeError, match="not implemented"):
        fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, backend=name)
    # Named process-wide, it raises as for every op (it used to mean auto here alone).
    monkeypatch.setenv("FUSEDECODE_BACKEND", name)
    with pytest.raises(RuntimeError, match="not implemented.*FUSEDECODE_BACKEND|FUSEDECODE_BACKEND.*not implemented"):
        fusedecode.linear_cross_entropy_entropy(hidden, weight, targets)


def test_unknown_backend_and_unsupported_triton_dtype_raise(generator):
    hidden, weight, targets, _ = make_inputs(generator, tokens=2, width=4, vocab=10)
    with pytest.raises(ValueError, match="backend"):
        fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, backend="fast")
    if unavailable_reason("triton", "cpu") is None:
        with pytest.raises(RuntimeError, match="float64"):
            fusedecode.linear_cross_entropy_entropy(hidden.double(), weight.double(), targets, backend="triton")
    else:
        with pytest.raises(RuntimeError, match="triton"):
            fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, backend="triton")


def _call(hidden=None, weight=None, targets=None, **kwargs):
    hidden = torch.zeros(3, 4) if hidden is None else hidden
    weight = torch.zeros(5, 4) if weight is None else weight
    targets = torch.zeros(3, dtype=torch.int64) if targets is None else targets
    return fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, backend="torch", **kwargs)


@pytest.mark.parametrize("call,error,match", [
    (lambda: _call(hidden=[[1.0]]), TypeError, "hidden"),
    (lambda: _call(hidden=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "hidden"),
    (lambda: _call(hidden=torch.zeros(4)), ValueError, "hidden"),
    (lambda: _call(hidden=torch.zeros(1, 1, 3, 4)), ValueError, "hidden"),
    (lambda: _call(hidden=torch.zeros(0, 4), targets=torch.zeros(0, dtype=torch.int64)), ValueError, "T >= 1"),
    (lambda: _call(hidden=torch.zeros(0, 3, 4), targets=torch.zeros(0, 3, dtype=torch.int64)), ValueError, "B >= 1"),
    (lambda: _call(weight=torch.zeros(5, 4, dtype=torch.float16)), TypeError, "weight"),
    (lambda: _call(weight=torch.zeros(5, 3)), ValueError, "weight"),
    (lambda: _call(weight=torch.zeros(5)), ValueError, "weight"),
    (lambda: _call(weight=torch.zeros(0, 4)), ValueError, "weight"),
    (lambda: _call(weight="w"), TypeError, "weight"),
    (lambda: _call(targets=torch.zeros(3, dtype=torch.int32)), TypeError, "targets"),
    (lambda: _call(targets=torch.zeros(3)), TypeError, "targets"),
    (lambda: _call(targets=torch.zeros(4, dtype=torch.int64)), ValueError, "targets"),
    (lambda: _call(hidden=torch.zeros(2, 3, 4), targets=torch.zeros(3, 3, dtype=torch.int64)), ValueError,
     "targets"),
    (lambda: _call(targets=torch.tensor([0, 5, 1])), ValueError, "targets"),
    (lambda: _call(targets=torch.tensor([0, -1, 1])), ValueError, "targets"),
    (lambda: _call(delta=torch.zeros(3)), ValueError, "delta"),
    (lambda: _call(delta=torch.zeros(1, 4)), ValueError, "delta"),
    (lambda: _call(hidden=torch.zeros(2, 3, 4), targets=torch.zeros(2, 3, dtype=torch.int64),
                   delta=torch.zeros(3, 4)), ValueError, "delta"),
    (lambda: _call(delta=torch.zeros(4, dtype=torch.float64)), TypeError, "delta"),
    (lambda: _call(hidden=torch.zeros(3, 4, dtype=torch.float16), weight=torch.zeros(5, 4, dtype=torch.float16),
                   delta=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "delta"),
    (lambda: _call(delta=[0.0] * 4), TypeError, "delta"),
    (lambda: _call(temperature=0.0), ValueError, "temperature"),
    (lambda: _call(temperature=-1.0), ValueError, "temperature"),
    (lambda: _call(temperature=math.inf), ValueError, "temperature"),
    (lambda: _call(temperature="hot"), TypeError, "temperature"),
    (lambda: _call(chunk=0), ValueError, "chunk"),
    (lambda: _call(chunk=2.5), TypeError, "chunk"),
    (lambda: _call(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: _call(bias=torch.zeros(4)), ValueError, "bias"),
    (lambda: _call(bias=torch.zeros(1, 5)), ValueError, "bias"),
    (lambda: _call(bias=torch.zeros(5, dtype=torch.float64)), TypeError, "bias"),
    (lambda: _call(bias=[0.0] * 5), TypeError, "bias"),
    (lambda: _call(logit_scale=math.nan), ValueError, "logit_scale"),
    (lambda: _call(logit_scale=math.inf), ValueError, "logit_scale"),
    (lambda: _call(logit_scale="big"), TypeError, "logit_scale"),
    (lambda: _call(logit_scale=torch.tensor(2.0)), TypeError, "logit_scale"),
    (lambda: _call(softcap=0.0), ValueError, "softcap"),
    (lambda: _call(softcap=-30.0), ValueError, "softcap"),
    (lambda: _call(softcap=math.inf), ValueError, "softcap"),
    (lambda: _call(softcap=True), TypeError, "softcap"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_errors_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_custom_ignore_index(backend, generator):
    hidden, weight, targets, _ = make_inputs(generator, tokens=6, width=8, vocab=60, ignored_fraction=0.0)
    targets[2] = -1
    ce, _ = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, ignore_index=-1, backend=backend)
    targets[2] = IGNORE
    expected, _ = reference(hidden, weight, targets)
    assert_close(ce, expected, "ce", 1e-4, 1e-5)


# ------------------------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile


@pytest.mark.parametrize("batch", [1, 2])
def test_opcheck(backend, batch, generator):
    hidden, weight, targets, delta = make_inputs(generator, batch=batch, tokens=3, width=6, vocab=70,
                                                 delta="per_batch")
    bias = (0.5 * torch.randn(70, generator=generator)).requires_grad_()
    for transform in ((None, None, None), (bias, -0.7, 1.5)):
        args = (hidden, weight, targets, delta) + transform + (0.9, IGNORE, 2, True, True, True,
                                                               transform[0] is not None)
        torch.library.opcheck(forward_op(backend).default, args)
        scale = torch.rand(batch, generator=generator)
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in transform)
        torch.library.opcheck(weight_grad_op(backend).default,
                              (hidden.detach(), weight.detach(), targets, delta.detach()) + detached
                              + (scale, IGNORE, 2))


@pytest.mark.parametrize("transform", ["none", "all"])
def test_torch_compile_fullgraph(transform, generator):
    hidden, weight, targets, _ = make_inputs(generator, batch=2, tokens=5, width=8, vocab=64)
    hidden, weight = hidden.detach(), weight.detach()
    kwargs = {} if transform == "none" else transform_kwargs(transform, generator, 64)
    if "bias" in kwargs:
        kwargs["bias"] = kwargs["bias"].detach()

    def srgen_loss(delta):
        ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, delta=delta, chunk=2,
                                                              temperature=0.7, backend="torch", **kwargs)
        return (0.95 * ce + 0.05 * entropy).sum()

    torch._dynamo.reset()
    compiled = torch.compile(srgen_loss, fullgraph=True)
    delta = (torch.randn((2, 8), generator=generator) * 0.1).requires_grad_(True)
    eager_delta = delta.detach().clone().requires_grad_(True)
    loss = compiled(delta)
    loss.backward()
    eager = srgen_loss(eager_delta)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(delta.grad, eager_delta.grad)


# ------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("transform", ["none", "all", "saturating_softcap"])
@pytest.mark.parametrize("gpu_backend", ["triton", "torch"])
def test_bf16_on_gpu(gpu_backend, transform, generator):
    require_backend("cuda", gpu_backend)
    hidden, weight, targets, delta = make_inputs(generator, batch=2, tokens=300, width=64, vocab=5003,
                                                 dtype=torch.bfloat16, delta="shared", device="cuda")
    kwargs = {} if transform == "none" else transform_kwargs(transform, generator, 5003, torch.bfloat16)
    if "bias" in kwargs:
        kwargs["bias"] = kwargs["bias"].detach().cuda().requires_grad_()
    # Logits come back unrounded from the bf16 matmul (out_dtype=float32); gradients are rounded to
    # bf16 before their matmuls.
    check_against_reference(gpu_backend, hidden, weight, targets, delta, generator=generator, chunk=128,
                            rtol=1e-2, atol=1e-2, **kwargs)


@pytest.mark.cuda
def test_auto_picks_triton_on_gpu(generator):
    require_backend("cuda", "triton")
    hidden, weight, targets, _ = make_inputs(generator, tokens=40, width=32, vocab=1000, device="cuda")
    ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets)
    ref_ce, ref_entropy = reference(hidden, weight, targets)
    assert_close(ce, ref_ce, "ce", 1e-4, 2e-5, LOSS_ABSOLUTE)
    assert_close(entropy, ref_entropy, "entropy", 1e-4, 2e-5, LOSS_ABSOLUTE)
