"""GPU-only behaviour: CUDA graphs, torch.compile, streams, both CUDA launch paths.

Marked `cuda`: skipped without a GPU. The correctness battery of test_logit_stats.py also runs on the
GPU through its cuda-* parameters.
"""

import math

import pytest
import torch

import fusedecode
from fusedecode.backends import unavailable_reason
from helpers import assert_close_to_reference, chi_square_pvalue, random_logits
from support.adversarial_rows import LOGIT_CASES

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["cuda", "triton"]


def need(backend):
    reason = unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(f"backend/device unavailable here: {reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend, generator):
    need(backend)
    static_in = random_logits((4, 50000), generator, dtype=torch.bfloat16, device="cuda")
    temperature = torch.full((4,), 0.8, device="cuda")
    ids = torch.randint(0, 50000, (4,), generator=generator).cuda()

    def step():
        return fusedecode.logit_stats(static_in, temperature=temperature, token_ids=ids, topk=8, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture (compilation, workspaces)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(3):
        fresh = random_logits((4, 50000), generator, dtype=torch.bfloat16, device="cuda")
        static_in.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_out, fresh, temperature=temperature, token_ids=ids, topk=8,
                                  context=f"[graph replay {backend}]")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_cuda(backend, generator):
    need(backend)
    torch._dynamo.reset()

    def step(logits):
        stats = fusedecode.logit_stats(logits, temperature=0.6, topk=5, backend=backend)
        return stats.entropy, stats.argmax, stats.topk_confidence

    compiled = torch.compile(step, fullgraph=True)
    logits = random_logits((8, 32000), generator, dtype=torch.bfloat16, device="cuda")
    for got, want in zip(compiled(logits), step(logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 131, 700, 2048])
def test_cuda_row_and_split_paths(rows, generator):
    # Few rows: vocab split across CTAs with a last-CTA merge; many rows: one CTA per row.
    need("cuda")
    logits = random_logits((rows, 20000), generator, dtype=torch.float16, device="cuda")
    logits[0, 19999] = 40.0
    if rows > 3:
        logits[3, 100:] = -math.inf
    ids = torch.randint(0, 20000, (rows,), generator=generator).cuda()
    stats = fusedecode.logit_stats(logits, token_ids=ids, topk=10, backend="cuda")
    assert_close_to_reference(stats, logits, token_ids=ids, topk=10, context=f"[rows={rows}]")
    assert stats.argmax[0].item() == 19999


def test_side_stream_and_counter_reuse(generator):
    # Split mode leaves its per-stream counters at zero: many calls on two streams stay correct.
    need("cuda")
    logits = random_logits((2, 151936), generator, dtype=torch.bfloat16, device="cuda")
    expected = fusedecode.logit_stats(logits, backend="torch")
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            for _ in range(5):
                got = fusedecode.logit_stats(logits, backend="cuda")
        stream.synchronize()
        torch.testing.assert_close(got.entropy, expected.entropy, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.argmax, expected.argmax)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bad_temperature_row_in_graph_gives_nan(backend, generator):
    # Inside capture the host-side check is skipped; the kernel turns the row into NaN.
    need(backend)
    logits = random_logits((3, 5000), generator, device="cuda")
    temperature = torch.tensor([1.0, 1.0, 1.0], device="cuda")
    fusedecode.logit_stats(logits, temperature=temperature, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedecode.logit_stats(logits, temperature=temperature, backend=backend)
    temperature[1] = -1.0
    graph.replay()
    torch.cuda.synchronize()
    assert math.isnan(out.entropy[1].item()) and out.argmax[1].item() == -1
    assert not math.isnan(out.entropy[0].item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "multi_draft"])
def test_verify_tree_in_cuda_graph(backend, mode, generator):
    need(backend)
    batch, nodes, vocab = 4, 9, 40000
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 4]).cuda()
    tokens = torch.randint(0, vocab, (batch, nodes), generator=generator).cuda()
    logits = random_logits((batch, nodes, vocab), generator, dtype=torch.bfloat16, device="cuda")
    probs = torch.softmax(random_logits((batch, nodes, vocab), generator, device="cuda"), -1)
    seeds = torch.arange(batch, dtype=torch.int64, device="cuda")
    kwargs = dict(temperature=0.0 if mode == "greedy" else 0.9, seed=seeds, validate=False, backend=backend)
    if mode == "multi_draft":
        kwargs["draft_probs"] = probs
    expected = fusedecode.verify_tree(logits, tokens, parents, **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedecode.verify_tree(logits, tokens, parents, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.output_tokens, expected.output_tokens)
    assert torch.equal(out.num_accepted, expected.num_accepted)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_verify_tree_compile_cuda(backend, generator):
    need(backend)
    torch._dynamo.reset()
    parents = torch.tensor([-1, 0, 1, 1]).cuda()
    tokens = torch.randint(0, 1000, (2, 4), generator=generator).cuda()
    seeds = torch.tensor([1, 2], device="cuda")

    def step(logits):
        out = fusedecode.verify_tree(logits, tokens, parents, temperature=0.5, seed=seeds, validate=False,
                                     backend=backend)
        return out.output_tokens, out.stats.entropy

    logits = random_logits((2, 4, 1000), generator, device="cuda")
    got = torch.compile(step, fullgraph=True)(logits)
    want = step(logits)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 2048])
def test_adversarial_rows_on_both_launch_paths(backend, rows, generator):
    # The hostile rows of tests/support/adversarial_rows.py tiled to few rows (vocabulary split across CTAs /
    # programs, last-CTA merge) and to many rows (one CTA per row).
    need(backend)
    for case in ("far_-1e20", "far_finfo_min", "one_finite_among_finfo_min", "near_float_max", "mixed_1e30",
                 "large_offsets", "temperature_extremes", "subnormal", "bf16_extremes", "split_vocab"):
        args = LOGIT_CASES[case](generator)
        logits = args["logits"]
        repeat = -(-rows // logits.shape[0])
        index = torch.arange(repeat * logits.shape[0])[:rows] % logits.shape[0]
        kwargs = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in args.items() if k != "logits"}
        logits = logits[index].cuda()
        kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        stats = fusedecode.logit_stats(logits, backend=backend, **kwargs)
        assert_close_to_reference(stats, logits, context=f"[{case} rows={rows} {backend}]", **kwargs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_temperature_outside_float32_in_graph_gives_nan(backend, generator):
    # Inside capture the host check is skipped: a temperature whose reciprocal overflows float32
    # (or that is 0 in float32) turns its row into NaN in the kernel; other rows are untouched.
    need(backend)
    logits = random_logits((4, 3000), generator, device="cuda")
    temperature = torch.ones(4, device="cuda")
    fusedecode.logit_stats(logits, temperature=temperature, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedecode.logit_stats(logits, temperature=temperature, topk=3, backend=backend)
    temperature.copy_(torch.tensor([1.0, 1e-39, 0.0, 3e-39], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert [math.isnan(v) for v in out.entropy.tolist()] == [False, True, True, False]
    assert out.argmax[1].item() == -1 and out.argmax[3].item() >= 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_verify_tree_invalid_input_in_graph(backend, generator):
    # validate=False under capture: out-of-range draft tokens and parents stay memory-safe and are
    # never accepted (compute-sanitizer runs tests/support/memcheck_invalid_inputs.py for the reads).
    need(backend)
    vocab = 50
    logits = torch.full((2, 4, vocab), -5.0, device="cuda")
    logits[:, :, 3] = 20.0
    tokens = torch.tensor([[0, 3 + vocab, 3 + 10**7, 3], [0, 3 - vocab, 3, 3]], device="cuda")
    parents = torch.tensor([[-1, 0, 0, 7], [-1, 0, 2, 1]], device="cuda")
    probs = torch.full((2, 4, vocab), 1.0 / vocab, device="cuda")
    seeds = torch.tensor([1, 2], device="cuda")
    kwargs = dict(temperature=0.5, draft_probs=probs, seed=seeds, validate=False, backend=backend)
    fusedecode.verify_tree(logits, tokens, parents, **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedecode.verify_tree(logits, tokens, parents, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    # Row 0: node 3's parent (7) is out of range, the others draft out-of-range tokens: nothing is
    # accepted. Row 1: node 2 (parent 2 = itself) is unreachable; node 1 drafts 3 - V: nothing either.
    assert out.num_accepted.tolist() == [0, 0]
    assert out.output_tokens[:, 0].tolist() == [3, 3]


@pytest.mark.parametrize("mode", ["sample", "multi_draft"])
@pytest.mark.parametrize("vocab", [1, 2, 7, 100, 1000, 4095, 4096, 4097])
def test_verify_tree_small_vocab_samples_the_target(mode, vocab, generator):
    # V <= 4096 is one slice per row in the statistics pass (the sampling pass once read slice states
    # that pass had not written). The first emitted token follows the target (SpecInfer is lossless
    # with children drawn from q), and the walk takes the cpp backend's tokens for nearly every row
    # (same Philox draws; only draws within float32 rounding of a boundary may differ).
    need("cuda")
    batch, temperature = 4000, 0.9
    row = random_logits((vocab,), generator, scale=1.5)
    logits = row.expand(batch, 3, vocab).contiguous()
    p = torch.softmax(row.double() / temperature, -1)
    q = torch.softmax(random_logits((vocab,), generator, scale=1.5).double(), -1)
    tokens = torch.zeros((batch, 3), dtype=torch.int64)
    tokens[:, 1:] = torch.multinomial(q, batch * 2, replacement=True, generator=generator).view(batch, 2)
    parents = torch.tensor([-1, 0, 0])
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    kwargs = dict(temperature=temperature, seed=seeds)
    if mode == "multi_draft":
        kwargs["draft_probs"] = q.float().expand(batch, 3, vocab).contiguous()
    out = fusedecode.verify_tree(logits.cuda(), tokens.cuda(), parents.cuda(), backend="cuda",
                                 **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    first = out.output_tokens[:, 0].cpu()
    assert ((first >= 0) & (first < vocab)).all()
    if vocab > 1:
        assert chi_square_pvalue(torch.bincount(first, minlength=vocab), p) > 1e-3
    cpp = fusedecode.verify_tree(logits, tokens, parents, backend="cpp", **kwargs)
    differing = (out.output_tokens.cpu() != cpp.output_tokens).any(-1).sum().item()
    assert differing <= batch // 50, f"{differing} of {batch} rows differ from the cpp backend"
