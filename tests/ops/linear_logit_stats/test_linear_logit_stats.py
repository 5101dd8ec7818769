"""fusedecode.linear_logit_stats: logit_stats of a head's logits, tile by tile, on every CPU backend,
against the float64 reference of the materialised, transformed logits."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedecode
from fusedecode.reference import head_logits_reference
from helpers import assert_close_to_reference, require_backend

CPU_BACKENDS = ["torch", "cpp", "triton"]
# The Triton interpreter evaluates padding lanes (-inf * 0) before masking them out.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")

TRANSFORMS = {
    "plain": {},
    "bias": dict(bias=True),
    "scale": dict(logit_scale=0.0625),
    "softcap": dict(softcap=5.0),
    "all": dict(bias=True, logit_scale=1.7, softcap=8.0),
}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    require_backend("cpu", request.param)
    return request.param


def make_head(generator, shape, vocab, dtype=torch.float32, scale=3.0):
    """hidden ``shape + [H]`` and weight ``[V, H]`` whose logits have a spread of about ``scale``."""
    *rows, width = shape
    hidden = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.randn((vocab, width), generator=generator, dtype=torch.float64) * (scale / math.sqrt(width))
    return hidden.to(dtype), weight.to(dtype)


def transform_arguments(name, generator, vocab, dtype):
    arguments = dict(TRANSFORMS[name])
    if arguments.pop("bias", False):
        arguments["bias"] = torch.randn(vocab, generator=generator).to(dtype)
    return arguments


def check(hidden, weight, backend, **kwargs):
    """linear_logit_stats against logit_stats' float64 reference on the float64 head logits."""
    head = {key: kwargs[key] for key in ("bias", "logit_scale", "softcap") if key in kwargs}
    stats = fusedecode.linear_logit_stats(hidden, weight, backend=backend, **kwargs)
    logits = head_logits_reference(hidden, weight, **head)
    statistics = {key: kwargs[key] for key in ("temperature", "token_ids", "topk") if key in kwargs}
    context = f"[backend={backend} hidden={tuple(hidden.shape)} V={weight.shape[0]} {hidden.dtype} {sorted(kwargs)}]"
    assert_close_to_reference(stats, logits, context=context, **statistics)
    return stats


# ------------------------------------------------------------------------------------------------
# Equality with logit_stats of the materialised logits


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_matches_materialised_logits(backend, transform, generator):
    # V = 1000 with chunks of 3 rows: the last chunk is partial and V is no power of two.
    hidden, weight = make_head(generator, (7, 24), 1000)
    check(hidden, weight, backend, chunk=3, topk=5, **transform_arguments(transform, generator, 1000, torch.float32))


@pytest.mark.parametrize("shape,vocab,chunk", [((1, 16), 333, None), ((1, 16), 1, 1), ((2, 5, 8), 129, 4),
                                               ((3, 1, 2, 8), 50, 2), ((0, 8), 40, None), ((2, 0, 8), 40, 3)])
def test_leading_shapes_and_chunks_match_materialised_logits(backend, shape, vocab, chunk, generator):
    hidden, weight = make_head(generator, shape, vocab)
    stats = check(hidden, weight, backend, chunk=chunk, softcap=20.0)
    assert stats.entropy.shape == shape[:-1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_half_precision_head_matches_reference_on_rounded_inputs(backend, dtype, transform, generator):
    """Half-precision hidden states and weight: the logits are the float32 sums of their exact
    products (as cuBLAS makes them), compared with the reference on the same rounded inputs."""
    hidden, weight = make_head(generator, (2, 6, 64), 515, dtype=dtype)
    bias_dtype = torch.float32 if transform == "all" and dtype == torch.float16 else dtype
    check(hidden, weight, backend, chunk=4, topk=3, **transform_arguments(transform, generator, 515, bias_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weight_widened_in_slices(backend, dtype, generator, monkeypatch):
    """On CPU a half-precision weight is widened to float32 a slice of the vocabulary at a time:
    slices of 7 rows here, so that V = 515 ends in a partial one."""
    from fusedecode.ops import _tiled_head

    monkeypatch.setattr(_tiled_head, "_WIDEN_BYTES", 4 * 64 * 7)
    hidden, weight = make_head(generator, (3, 64), 515, dtype=dtype)
    check(hidden, weight, backend, chunk=2, topk=2, softcap=4.0)


def test_half_precision_logits_are_not_rounded(backend, generator):
    """A logit whose float16 rounding would move the result: the head must not round to float16.

    Row 0's logits are 1 and 1 + 2^-12 (float16 has 10 mantissa bits: both round to 1), so
    max_logprob differs from log(1/2) only if the exact logits are kept."""
    hidden = torch.tensor([[1.0, 2.0**-12]], dtype=torch.float16)
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float16)
    stats = check(hidden, weight, backend, temperature=2.0**-12)
    assert stats.argmax.item() == 1


def test_token_ids_topk_and_temperature_tensor(backend, generator):
    hidden, weight = make_head(generator, (3, 4, 16), 301)
    token_ids = torch.randint(0, 301, (3, 4), generator=generator, dtype=torch.int32)
    temperature = torch.rand((3, 4), generator=generator) * 2 + 0.05
    check(hidden, weight, backend, chunk=5, token_ids=token_ids, topk=64, temperature=temperature,
          logit_scale=0.5, softcap=10.0)
    check(hidden, weight, backend, chunk=2, token_ids=token_ids.long(), temperature=0.7)


def test_nan_and_inf_rows(backend, generator):
    """A NaN hidden state makes its row's logits NaN, an infinite one makes them +-inf: every float
    field NaN and argmax -1 there, the other rows untouched. Soft-capping maps +-inf to +-softcap, a
    finite row. A NaN in the weight poisons every row; huge finite logits stay exact."""
    hidden, weight = make_head(generator, (6, 12), 77)
    hidden[1, 3] = float("nan")
    hidden[4, 0] = float("inf")
    token_ids = torch.zeros(6, dtype=torch.long)
    stats = check(hidden, weight, backend, chunk=4, token_ids=token_ids, topk=2, logit_scale=2.0)
    assert stats.argmax[1].item() == -1 and stats.argmax[4].item() == -1
    assert math.isnan(stats.entropy[1].item()) and math.isnan(stats.token_logprob[4].item())
    assert not torch.isnan(stats.entropy[[0, 2, 3, 5]]).any()

    capped = check(hidden, weight, backend, chunk=4, token_ids=token_ids, topk=2, softcap=3.0)
    assert capped.argmax[1].item() == -1 and capped.argmax[4].item() >= 0

    poisoned = weight.clone()
    poisoned[10, 5] = float("nan")
    stats = check(hidden, poisoned, backend, chunk=4)
    assert (stats.argmax == -1).all()

    check(hidden[[0, 2]] * 1e30, weight, backend, chunk=4, softcap=3.0)


def test_bias_of_float32_with_half_weight(backend, generator):
    hidden, weight = make_head(generator, (5, 32), 200, dtype=torch.bfloat16)
    bias = torch.randn(200, generator=generator) * 4
    check(hidden, weight, backend, bias=bias, chunk=2)


def test_strided_hidden(backend, generator):
    hidden, weight = make_head(generator, (4, 9, 20), 90)
    view = hidden.transpose(0, 1)[:, :, 2:18]  # [9, 4, 16], rows not contiguous
    check(view, weight[:, 2:18], backend, chunk=3)


def test_same_result_for_every_chunk(backend, generator):
    """Chunks only split the rows: results agree to the matmul's rounding (BLAS blocks rows of
    different counts differently), for chunks of one row, several, all rows and more than all."""
    hidden, weight = make_head(generator, (11, 16), 129)
    results = [fusedecode.linear_logit_stats(hidden, weight, chunk=chunk, backend=backend, topk=4, softcap=7.0)
               for chunk in (1, 4, 11, 1000)]
    for other in results[1:]:
        for field in ("entropy", "logsumexp", "topk_confidence"):
            torch.testing.assert_close(getattr(other, field), getattr(results[0], field), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Memory: never more than one chunk of logits


def test_largest_tensor_is_one_chunk(generator):
    """The torch backend's every intermediate (its inner ops are visible to a dispatch mode): none
    holds more memory than ``chunk * V`` float64 values (the per-chunk reference statistics compute
    in float64), or the weight. Storage is counted, not elements: broadcast views cost nothing."""
    tokens, vocab, width, chunk = 64, 500, 16, 8
    hidden, weight = make_head(generator, (tokens, width), vocab)

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, tensor.untyped_storage().nbytes())
            return out

    with LargestTensor():
        fusedecode.linear_logit_stats(hidden, weight, chunk=chunk, backend="torch", topk=3, softcap=5.0,
                                      bias=torch.zeros(vocab))
    assert LargestTensor.largest <= max(chunk * vocab * 8, vocab * width * 4), LargestTensor.largest
    assert LargestTensor.largest < tokens * vocab * 4


# Run in a fresh process (a heap of its own): builds the inputs, warms up, resets the peak resident
# memory (Linux: /proc/self/clear_refs) and prints its growth over the resident memory at that point.
_PEAK_SCRIPT = """
import re, sys, torch, fusedecode
backend, tokens, vocab, width, chunk, materialise = sys.argv[1], *map(int, sys.argv[2:])
def status(field):
    with open("/proc/self/status") as handle:
        return int(re.search(field + r":\\s+(\\d+) kB", handle.read()).group(1)) * 1024
torch.manual_seed(0)
hidden, weight = torch.randn(tokens, width), torch.randn(vocab, width) / width ** 0.5
def run():
    if materialise:  # what the op replaces: the whole [T, V] logits, then logit_stats
        return fusedecode.logit_stats(hidden @ weight.T, backend=backend)
    return fusedecode.linear_logit_stats(hidden, weight, chunk=chunk, backend=backend, softcap=30.0)
run()
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
run()
print(status("VmHWM") - before)
"""


def _peak_extra_bytes(backend, tokens, vocab, width, chunk, materialise=False):
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak resident memory here (/proc/self/clear_refs)")
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, backend, *map(str, (tokens, vocab, width, chunk,
                                                                                    int(materialise)))],
                            capture_output=True, text=True, check=True, env=dict(os.environ, TRITON_INTERPRET="1"))
    return int(result.stdout.split()[-1])


def test_peak_memory_is_one_chunk():
    """Measured peak extra memory of the cpp backend: near one chunk of logits, far below the
    materialised ``[T, V]`` float32 logits (8 chunks), which the same measurement sees. (The Triton
    backend runs the same tiled pass; under the interpreter its memory is the interpreter's.)"""
    require_backend("cpu", "cpp")
    tokens, vocab, width, chunk = 2048, 16384, 32, 256
    one_chunk, materialised = chunk * vocab * 4, tokens * vocab * 4
    assert _peak_extra_bytes("cpp", tokens, vocab, width, chunk) < 3 * one_chunk
    assert _peak_extra_bytes("cpp", tokens, vocab, width, chunk, materialise=True) > 0.9 * materialised


# ------------------------------------------------------------------------------------------------
# Validation (opcheck and torch.compile: tests/ops/test_registry.py)


def test_bad_arguments_raise_errors_naming_them():
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    cases = [
        (dict(hidden=hidden.double()), TypeError, "hidden"),
        (dict(hidden=torch.randn(8)), ValueError, "hidden"),
        (dict(hidden=[[1.0]]), TypeError, "hidden"),
        (dict(weight=weight.half()), TypeError, "weight"),
        (dict(weight=torch.randn(20, 7)), ValueError, "weight"),
        (dict(weight=torch.randn(20)), ValueError, "weight"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight"),
        (dict(bias=torch.randn(19)), ValueError, "bias"),
        (dict(bias=torch.randn(20).double()), TypeError, "bias"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
        (dict(logit_scale="2"), TypeError, "logit_scale"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=torch.ones(4)), ValueError, "temperature"),
        (dict(token_ids=torch.tensor([0, 1, 20])), ValueError, "token_ids"),
        (dict(token_ids=torch.zeros(3)), TypeError, "token_ids"),
        (dict(token_ids=torch.zeros(2, dtype=torch.long)), ValueError, "token_ids"),
        (dict(topk=65), ValueError, "topk"),
        (dict(topk=True), TypeError, "topk"),
        (dict(chunk=0), ValueError, "chunk"),
        (dict(chunk=2.0), TypeError, "chunk"),
        (dict(backend="numpy"), ValueError, "backend"),
    ]
    for override, error, name in cases:
        arguments = dict(hidden=hidden, weight=weight)
        arguments.update(override)
        with pytest.raises(error, match=name):
            fusedecode.linear_logit_stats(arguments.pop("hidden"), arguments.pop("weight"), **arguments)


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        fusedecode.linear_logit_stats(torch.randn(2, 4), torch.randn(5, 4), backend="cuda")
