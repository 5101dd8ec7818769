"""verify_tree reads draft_probs through its strides: a [B, N, V] view whose rows are not packed
(a slice of a wider buffer, batch and node dimensions swapped) gives exactly the result of its
contiguous copy on every backend (a strided vocabulary dimension is a ValueError, see
test_verify_tree's validation cases)."""

import torch

import fusedecode


def strided_views(probs):
    """Views of ``probs`` [B, N, V] with the same values and other strides."""
    batch, nodes, vocab = probs.shape
    wide = torch.full((batch, nodes, vocab + 5), 0.25, device=probs.device)
    wide[:, :, 2:2 + vocab] = probs
    swapped = probs.transpose(0, 1).contiguous().transpose(0, 1)
    node_major = torch.full((nodes * 2, batch, vocab), 0.5, device=probs.device)
    node_major[::2] = probs.transpose(0, 1)
    return {"row padding": wide[:, :, 2:2 + vocab], "batch and node swapped": swapped,
            "every other node": node_major[::2].transpose(0, 1)}


def test_strided_draft_probs_are_read_through_their_strides(target):
    device, backend = target
    generator = torch.Generator().manual_seed(17)  # fixed: the uniform-q run below must differ
    batch, vocab = (6 if (device, backend) == ("cpu", "triton") else 24), 37
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4])
    nodes = parents.numel()
    logits = torch.randn((batch, nodes, vocab), generator=generator)
    probs = torch.softmax(torch.randn((batch, nodes, vocab), generator=generator) * 2, -1)
    # Draft tokens the draft likes, so that acceptance depends on the q values actually read.
    tokens = torch.multinomial(probs[:, parents.clamp(min=0)].reshape(-1, vocab), 1, generator=generator).view(batch, nodes)
    tokens[:, 0] = 0
    seeds = torch.arange(batch, dtype=torch.int64) * 31 + 7
    run = lambda q: fusedecode.verify_tree(logits.to(device), tokens.to(device), parents.to(device),  # noqa: E731
                                           temperature=1.0, draft_probs=q.to(device), seed=seeds.to(device),
                                           backend=backend)
    want = run(probs)
    # The draft rows matter: a uniform q gives other walks (so a kernel reading the wrong rows fails).
    other = run(torch.full_like(probs, 1.0 / vocab))
    assert not torch.equal(other.output_tokens, want.output_tokens)
    for name, view in strided_views(probs.to(device)).items():
        assert not view.is_contiguous() and view.stride(-1) == 1, name
        got = run(view)
        assert torch.equal(got.output_tokens, want.output_tokens), name
        assert torch.equal(got.accepted_nodes, want.accepted_nodes), name
