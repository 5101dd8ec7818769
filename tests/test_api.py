"""Public API: argument validation, backend dispatch, custom-op registration, build facts."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import fusedecode
from fusedecode.backends import resolve_backend, unavailable_reason
from helpers import assert_close_to_reference, random_logits


def native_available():
    return unavailable_reason("cpp", "cpu") is None


def triton_interpreter_available():
    return unavailable_reason("triton", "cpu") is None


# ------------------------------------------------------------------------------------------------
# Validation: TypeError / ValueError naming the argument, before any kernel runs.

@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("call,error,match", [
    (lambda b: fusedecode.logit_stats([1.0, 2.0], backend=b), TypeError, "logits"),
    (lambda b: fusedecode.logit_stats(torch.zeros(3, dtype=torch.int64), backend=b), TypeError, "logits"),
    (lambda b: fusedecode.logit_stats(torch.zeros(3, dtype=torch.float64), backend=b), TypeError, "logits"),
    (lambda b: fusedecode.logit_stats(torch.tensor(1.0), backend=b), ValueError, "logits"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 0), backend=b), ValueError, "logits"),
    (lambda b: fusedecode.logit_stats(torch.zeros(4, 3).t(), backend=b), ValueError, "contiguous"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=0.0, backend=b), ValueError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=-1.0, backend=b), ValueError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=math.inf, backend=b), ValueError,
     "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature="hot", backend=b), TypeError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=True, backend=b), TypeError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=torch.ones(3), backend=b), ValueError,
     "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=torch.tensor([1.0, 0.0]), backend=b),
     ValueError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), temperature=torch.tensor([1, 2]), backend=b),
     TypeError, "temperature"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), token_ids=torch.tensor([0.0, 1.0]), backend=b),
     TypeError, "token_ids"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), token_ids=torch.tensor([0, 3]), backend=b),
     ValueError, "token_ids"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), token_ids=torch.tensor([-1, 0]), backend=b),
     ValueError, "token_ids"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), token_ids=torch.tensor([0]), backend=b),
     ValueError, "token_ids"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), token_ids=[0, 1], backend=b), TypeError, "token_ids"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), topk=65, backend=b), ValueError, "topk"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), topk=-1, backend=b), ValueError, "topk"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), topk=2.0, backend=b), TypeError, "topk"),
    (lambda b: fusedecode.logit_stats(torch.zeros(2, 3), topk=True, backend=b), TypeError, "topk"),
])
def test_bad_arguments_raise_before_backend_selection(backend, call, error, match):
    # Validation comes before backend selection, so it holds whether or not the backend is built.
    with pytest.raises(error, match=match):
        call(backend)


def _half(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


# Every argument whose dtype must be another argument's: the message names both dtypes and says they
# must match (not just "must be float32", which reads as if float16 were unsupported).
@pytest.mark.parametrize("call,message", [
    (lambda: fusedecode.linear_logit_stats(torch.zeros(3, 4), _half(5, 4)), "weight is float16 but hidden is float32"),
    (lambda: fusedecode.linear_logit_stats(_half(3, 4), torch.zeros(5, 4)), "weight is float32 but hidden is float16"),
    (lambda: fusedecode.linear_logit_stats(_half(3, 4), _half(5, 4), bias=_half(5, dtype=torch.bfloat16)),
     "bias is bfloat16 but weight is float16"),
    (lambda: fusedecode.linear_cross_entropy_entropy(torch.zeros(3, 4), _half(5, 4), torch.zeros(3, dtype=torch.long)),
     "weight is float16 but hidden is float32"),
    (lambda: fusedecode.linear_cross_entropy_entropy(_half(3, 4), _half(5, 4), torch.zeros(3, dtype=torch.long),
                                                     delta=_half(4, dtype=torch.bfloat16)),
     "delta is bfloat16 but hidden is float16"),
    (lambda: fusedecode.linear_cross_entropy_entropy(_half(3, 4), _half(5, 4), torch.zeros(3, dtype=torch.long),
                                                     bias=_half(5, dtype=torch.bfloat16)),
     "bias is bfloat16 but weight is float16"),
], ids=["lls-weight-fp16", "lls-weight-fp32", "lls-bias", "lce-weight", "lce-delta", "lce-bias"])
def test_dtype_mismatch_names_both_dtypes(call, message):
    with pytest.raises(TypeError, match=re.escape(message) + ".*must match"):
        call()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fusedecode.logit_stats(torch.zeros(2, 3), backend="tpu")


# ------------------------------------------------------------------------------------------------
# Dispatch

def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        fusedecode.logit_stats(torch.zeros(2, 3), backend="cuda")


def test_auto_on_cpu_prefers_cpp_then_torch():
    expected = "cpp" if native_available() else "torch"
    assert resolve_backend(None, "cpu") == expected or os.environ.get("FUSEDECODE_BACKEND")
    assert resolve_backend("auto", "cpu") == expected


def test_environment_variable_selects_backend(monkeypatch, generator):
    monkeypatch.setenv("FUSEDECODE_BACKEND", "torch")
    assert resolve_backend(None, "cpu") == "torch"
    logits = random_logits((3, 100), generator)
    assert_close_to_reference(fusedecode.logit_stats(logits), logits)
    monkeypatch.setenv("FUSEDECODE_BACKEND", "cuda")
    with pytest.raises(RuntimeError):
        fusedecode.logit_stats(logits)
    monkeypatch.setenv("FUSEDECODE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSEDECODE_BACKEND"):
        fusedecode.logit_stats(logits)
    # The argument wins over the environment.
    assert_close_to_reference(fusedecode.logit_stats(logits, backend="torch"), logits)


def test_available_backends():
    names = fusedecode.available_backends()
    assert "torch" in names
    assert ("cpp" in names) == native_available()
    assert ("triton" in names) == (triton_interpreter_available() or (
        torch.cuda.is_available() and unavailable_reason("triton", "cuda") is None))


def test_build_info_and_cli():
    info = fusedecode.build_info()
    for key in ("version", "native", "torch_runtime", "triton", "python"):
        assert key in info
    if info["native"]:
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
        assert isinstance(info["with_cuda"], bool)
    out = subprocess.run([sys.executable, "-m", "fusedecode", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends" in out.stdout and "torch" in out.stdout


# ------------------------------------------------------------------------------------------------
# Custom ops: schemas, fake kernels, torch.compile

@pytest.mark.skipif(not native_available(), reason="cpp backend unavailable: extension not built")
def test_opcheck_native_op(generator):
    logits = random_logits((2, 3, 300), generator).as_strided((2, 3, 300), (900, 300, 1))
    for args in [(logits, None, 1.0, None, 0),
                 (logits, torch.rand(6) + 0.5, 1.0, torch.randint(0, 300, (6,), generator=generator), 5)]:
        torch.library.opcheck(torch.ops.fusedecode.logit_stats.default, args)


@pytest.mark.skipif(not triton_interpreter_available(), reason="triton interpreter unavailable (TRITON_INTERPRET)")
def test_opcheck_triton_op(generator):
    logits = random_logits((1, 4, 500), generator)
    torch.library.opcheck(torch.ops.fusedecode.logit_stats_triton.default,
                          (logits, None, 0.8, torch.tensor([1, 2, 3, 4]), 3))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_torch_compile_fullgraph(backend, generator):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(f"backend/device unavailable here: {unavailable_reason(backend, 'cpu')}")
    torch._dynamo.reset()

    def step(logits, token_ids):
        stats = fusedecode.logit_stats(logits, temperature=0.7, token_ids=token_ids, topk=4, backend=backend)
        return stats.entropy * 2 + stats.self_certainty, stats.argmax, stats.topk_confidence

    compiled = torch.compile(step, fullgraph=True)
    logits = random_logits((4, 1000), generator)
    ids = torch.randint(0, 1000, (4,), generator=generator)
    got = compiled(logits, ids)
    want = step(logits, ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Triton: both launch paths (one program per row; vocab slices + merge) on the same inputs

@pytest.mark.skipif(not triton_interpreter_available(), reason="triton interpreter unavailable (TRITON_INTERPRET)")
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_triton_row_and_split_paths(splits, generator):
    from fusedecode.ops.logit_stats import run_triton

    logits = random_logits((3, 20000), generator, dtype=torch.bfloat16)
    logits[1, 5000:] = -math.inf
    logits[2, 7] = math.nan
    ids = torch.randint(0, 20000, (3,), generator=generator)
    temperature = torch.tensor([0.5, 1.0, 2.0])
    out = run_triton(logits.view(1, 3, 20000), temperature, 1.0, ids, 7, splits=splits)
    stats = fusedecode.LogitStats(*(t.reshape(3) for t in out))
    assert_close_to_reference(stats, logits, temperature=temperature, token_ids=ids, topk=7,
                              context=f"[splits={splits}]")


# ------------------------------------------------------------------------------------------------
# Gradients: logit_stats has a backward (tests/ops/logit_stats); the ops that compute none refuse
# inputs that ask for one, rather than returning outputs that silently carry none.

def _needs_grad(*shape):
    return torch.randn(*shape).requires_grad_()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("call,name", [
    (lambda b: fusedecode.linear_logit_stats(_needs_grad(3, 4), torch.randn(5, 4), backend=b), "hidden"),
    (lambda b: fusedecode.linear_logit_stats(torch.randn(3, 4), _needs_grad(5, 4), backend=b), "weight"),
    (lambda b: fusedecode.linear_logit_stats(torch.randn(3, 4), torch.randn(5, 4), bias=_needs_grad(5), backend=b),
     "bias"),
    (lambda b: fusedecode.linear_logit_stats(torch.randn(3, 4), torch.randn(5, 4), temperature=_needs_grad(3).exp(),
                                             backend=b), "temperature"),
    (lambda b: fusedecode.verify_tree(_needs_grad(2, 3, 10), torch.zeros(2, 3, dtype=torch.long),
                                      torch.tensor([-1, 0, 1]), backend=b), "target_logits"),
    (lambda b: fusedecode.verify_tree(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long),
                                      torch.tensor([-1, 0, 1]), temperature=1.0,
                                      draft_probs=_needs_grad(2, 3, 10).softmax(-1), backend=b), "draft_probs"),
], ids=["lls-hidden", "lls-weight", "lls-bias", "lls-temperature", "verify-logits", "verify-draft_probs"])
def test_ops_without_gradients_refuse_inputs_that_require_grad(backend, call, name):
    with pytest.raises(ValueError, match=f"{name} requires grad.*computes no gradients"):
        call(backend)
    with torch.no_grad():  # the same call without grad mode runs
        try:
            call(backend)
        except RuntimeError as error:  # a backend this install cannot run
            assert "backend" in str(error) or backend in str(error)
