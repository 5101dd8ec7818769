"""Every custom op of fusedecode, op by op: its schema as the op's module declares it (``SCHEMAS``,
built from the op's output table) equals what torch registered (the native schemas come from
csrc/ops.cpp), ``torch.library.opcheck`` passes, and the public function compiles with
``torch.compile(fullgraph=True)`` on each fused backend available here."""

import pytest
import torch

import fusedecode
from fusedecode.backends import unavailable_reason
from fusedecode.ops import linear_ce, logit_stats, verify_tree
from helpers import random_logits

OP_MODULES = {"logit_stats": logit_stats, "verify_tree": verify_tree, "linear_ce": linear_ce}
# The backend each custom op runs on (named after the op: <name> native or torch, <name>_triton).
NATIVE = {"logit_stats", "verify_tree"}


def backend_of(name):
    if name.endswith("_triton"):
        return "triton"
    return "cpp" if name in NATIVE else "torch"


def all_custom_ops():
    return [(module, name) for module in OP_MODULES for name in OP_MODULES[module].SCHEMAS]


def require_op(name):
    reason = unavailable_reason(backend_of(name), "cpu")
    if reason:
        pytest.skip(f"{name}: {reason}")
    return getattr(torch.ops.fusedecode, name).default


@pytest.mark.parametrize("module,name", all_custom_ops())
def test_schema_is_the_op_modules(module, name):
    op = require_op(name)
    declared = torch._C.parse_schema(f"fusedecode::{name}{OP_MODULES[module].SCHEMAS[name]}")
    assert op._schema == declared, f"{name}: registered {op._schema}, the op module declares {declared}"


def test_every_registered_op_is_declared():
    declared = {name for _, name in all_custom_ops()}
    registered = {name for name in declared if hasattr(torch.ops.fusedecode, name)}
    for name in ("logit_stats", "verify_tree"):  # native ops: defined in csrc/ops.cpp when the extension is built
        if unavailable_reason("cpp", "cpu") is None:
            assert name in registered
    assert registered <= declared


# ------------------------------------------------------------------------------------------------
# opcheck: one set of sample arguments per custom op


def logit_stats_samples(generator):
    logits = random_logits((2, 3, 300), generator).as_strided((2, 3, 300), (900, 300, 1))
    return [(logits, None, 1.0, None, 0),
            (logits, torch.rand(6, generator=generator) + 0.5, 1.0, torch.randint(0, 300, (6,), generator=generator),
             5)]


def verify_tree_samples(generator):
    logits = torch.randn((2, 5, 300), generator=generator)
    tokens = torch.randint(0, 300, (2, 5), generator=generator)
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]])
    seeds = torch.tensor([3, 4])
    probs = torch.softmax(torch.randn((2, 5, 300), generator=generator), -1)
    return [(logits, tokens, parents, temperature, q, seeds, 3) for temperature, q in ((0.0, None), (0.7, None),
                                                                                       (0.7, probs))]


def linear_ce_forward_samples(generator):
    hidden = torch.randn((2, 3, 6), generator=generator, requires_grad=True)
    weight = torch.randn((70, 6), generator=generator, requires_grad=True)
    targets = torch.randint(0, 70, (2, 3), generator=generator)
    delta = torch.randn((2, 6), generator=generator, requires_grad=True)
    bias = torch.randn(70, generator=generator, requires_grad=True)
    return [(hidden, weight, targets, delta, None, None, None, 0.9, -100, 2, True, True, True, False),
            (hidden, weight, targets, delta, bias, -0.7, 1.5, 0.9, -100, 2, True, True, True, True)]


def linear_ce_weight_grad_samples(generator):
    hidden = torch.randn((2, 3, 6), generator=generator)
    weight = torch.randn((70, 6), generator=generator)
    targets = torch.randint(0, 70, (2, 3), generator=generator)
    return [(hidden, weight, targets, torch.randn((2, 6), generator=generator), None, None, None,
             torch.rand(2, generator=generator), -100, 2)]


SAMPLES = {"logit_stats": logit_stats_samples, "verify_tree": verify_tree_samples,
           "linear_ce_forward": linear_ce_forward_samples, "linear_ce_weight_grad": linear_ce_weight_grad_samples}


def test_every_custom_op_has_samples():
    for _, name in all_custom_ops():
        assert name.removesuffix("_triton") in SAMPLES, f"{name}: add opcheck samples to tests/ops/test_registry.py"


@pytest.mark.parametrize("module,name", all_custom_ops())
def test_opcheck(module, name, generator):
    op = require_op(name)
    for args in SAMPLES[name.removesuffix("_triton")](generator):
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# torch.compile of each public function on each fused backend (custom ops with fake kernels)


def compile_logit_stats(backend, generator):
    def step(logits, token_ids):
        stats = fusedecode.logit_stats(logits, temperature=0.7, token_ids=token_ids, topk=4, backend=backend)
        return stats.entropy * 2 + stats.self_certainty, stats.argmax, stats.topk_confidence

    return step, (random_logits((4, 1000), generator), torch.randint(0, 1000, (4,), generator=generator))


def compile_verify_tree(backend, generator):
    tokens = torch.tensor([[0, 5, 6, 7]])
    parents = torch.tensor([-1, 0, 1, 2])

    def step(logits, seed):
        out = fusedecode.verify_tree(logits, tokens, parents, temperature=0.8, seed=seed, backend=backend)
        return out.num_accepted, out.output_tokens, out.stats.entropy

    return step, (random_logits((1, 4, 12), generator), torch.tensor(1))


def compile_linear_ce(backend, generator):
    hidden = torch.randn((2, 5, 8), generator=generator)
    weight = torch.randn((64, 8), generator=generator)
    targets = torch.randint(0, 64, (2, 5), generator=generator)

    def step(hidden, weight, targets):
        ce, entropy = fusedecode.linear_cross_entropy_entropy(hidden, weight, targets, chunk=2, backend=backend)
        return ce, entropy

    return step, (hidden, weight, targets)


COMPILE_CASES = [("logit_stats", "cpp", compile_logit_stats), ("logit_stats", "triton", compile_logit_stats),
                 ("verify_tree", "cpp", compile_verify_tree), ("verify_tree", "triton", compile_verify_tree),
                 ("linear_ce", "torch", compile_linear_ce), ("linear_ce", "triton", compile_linear_ce)]


@pytest.mark.parametrize("module,backend,case", COMPILE_CASES, ids=[f"{m}-{b}" for m, b, _ in COMPILE_CASES])
def test_torch_compile_fullgraph(module, backend, case, generator):
    reason = unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(f"{backend}: {reason}")
    torch._dynamo.reset()
    step, args = case(backend, generator)
    got = torch.compile(step, fullgraph=True)(*args)
    want = step(*args)
    for index, (a, b) in enumerate(zip(got, want)):
        if module == "verify_tree" and index == 1:
            # Under compile the depth cannot be read from the tree: N wide, the same prefix.
            a = a[:, :b.shape[1]]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_verify_tree_slices_are_cut_alike():
    # verify_tree's sampling pass re-reads the slices its statistics pass cut; the native layout
    # (csrc/include/fusedecode/vocab_slices.h) and the Triton one must be the same size.
    from fusedecode import _native

    info = _native.native_build_info()
    if info is None:
        pytest.skip("the native extension is not built")
    pytest.importorskip("triton")
    from fusedecode.triton_kernels.verify_tree import SLICE_TOKENS

    assert info["verify_slice_tokens"] == SLICE_TOKENS
