"""``fusedecode.verify_tree``: verification of a whole draft token tree, with per-node statistics."""

from typing import Optional, Tuple

import torch

from . import _native
from ._types import LogitStats, TreeVerification
from ._validation import check_verify_tree_args
from .backends import resolve_backend
from .reference import verify_tree_reference

__all__ = ["verify_tree", "TreeVerification"]


def verify_tree(target_logits, draft_tokens, parents, *, temperature=0.0, draft_probs=None, seed=None,
                validate=True, backend=None):
    """Walk a draft tree against the target model's logits and return the accepted path.

    Node 0 is the root (the last committed token); node i >= 1 is a drafted token whose parent is
    ``parents[i]`` (``0 <= parents[i] < i``); siblings are tried in increasing index order.
    ``target_logits[b, i]`` are the target's logits for the token after node i (one tree-masked
    forward pass, see ``fusedecode.tree``).

    - ``temperature == 0`` (greedy): at node r take ``t = argmax(target_logits[b, r])``; move to the
      first child of r whose token is t, else stop and emit t. Identical to greedy decoding of the
      target alone.
    - ``temperature > 0``, no ``draft_probs``: at node r draw ``y ~ softmax(logits / T)``; move to the
      first child with token y, else emit y. Distributed exactly as sampling the target alone.
    - ``temperature > 0`` with ``draft_probs`` ``[B, N, V]`` (row r: the distribution q_r the children
      of r were drawn from, i.i.d.): SpecInfer's multi-draft speculative sampling. Children are tried
      in order, each accepted with probability ``min(1, p'(x)/q_r(x))``; after a rejection
      ``p' = normalize(max(p' - q_r, 0))`` (unchanged if that has no mass); if all are rejected
      emit ``y ~ p'``. Children with ``q_r(x) <= 0`` or non-finite are skipped; padding (-1) never
      accepted.
    - At a leaf a bonus token is emitted from the leaf's row (argmax, or a sample).

    Args:
        target_logits: float32/float16/bfloat16 ``[B, N, V]``, last dim contiguous.
        draft_tokens: int32/int64 ``[B, N]``; entry 0 ignored, -1 marks padding.
        parents: int32/int64 ``[N]`` (one tree for all rows) or ``[B, N]``.
        temperature: 0 (greedy), or a float T > 0 with 1/T finite in float32 (about 3e-39 < T < 3.4e38).
        draft_probs: optional ``[B, N, V]`` draft probabilities (multi-draft mode).
        seed: int (Python or NumPy, 0 <= seed < 2**63), int64 tensor ``[]`` or ``[B]`` (CUDA-graph
            safe), or None to draw one from torch's default generator (``torch.manual_seed`` makes
            runs reproducible).
        validate: check values (token range, tree shape); costs one sync for CUDA tensors. With
            ``validate=False`` invalid input gives an unspecified but memory-safe result: a draft
            token outside [0, V) is never accepted (nor read), a node whose parent is out of range
            or not before it is unreachable (node c is a child of r only when
            ``parents[c] == r < c``), and every walk ends within the tree. B = 0 gives empty outputs.
        backend: None, ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``TreeVerification(num_accepted [B], accepted_nodes [B, D+1], output_tokens [B, D+1],
        stats)`` with D the tree depth (N - 1 when it cannot be read without a sync: parents on the
        GPU with ``validate=False``, torch.compile, CUDA-graph capture) and ``stats`` the ``LogitStats`` ``[B, N]`` of every node's row at ``temperature`` (1.0 when
        greedy), computed in the same pass.

    Example::

        >>> import torch, fusedecode
        >>> tokens, parents = fusedecode.tree.tree_from_paths([[3, 1], [2]], root_token=0)
        >>> logits = torch.full((1, 4, 5), -5.0)
        >>> logits[0, 0, 3] = logits[0, 1, 1] = logits[0, 2, 4] = 5.0  # target wants 3, 1, 4
        >>> out = fusedecode.verify_tree(logits, tokens[None], parents)
        >>> out.num_accepted.tolist(), out.output_tokens.tolist()
        ([2], [[3, 1, 4]])
    """
    tokens, parent_rows, seeds, depth, temperature = check_verify_tree_args(
        target_logits, draft_tokens, parents, temperature, draft_probs, seed, validate)
    if draft_probs is not None and temperature == 0:
        draft_probs = None  # greedy verification does not look at the draft distribution
    name = resolve_backend(backend, target_logits.device)
    if name == "torch":
        return verify_tree_reference(target_logits, tokens, parent_rows, temperature, draft_probs, seeds, depth)

    op = torch.ops.fusedecode.verify_tree_triton if name == "triton" else torch.ops.fusedecode.verify_tree
    outputs = op(target_logits, tokens, parent_rows, temperature, draft_probs, seeds, depth)
    stats = LogitStats(*outputs[3:9])
    return TreeVerification(outputs[0], outputs[1], outputs[2], stats)


def _fake_outputs(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth):
    batch, nodes = target_logits.shape[:2]
    i64 = dict(dtype=torch.int64, device=target_logits.device)
    f32 = dict(dtype=torch.float32, device=target_logits.device)
    return (
        target_logits.new_empty((batch,), **i64),
        target_logits.new_empty((batch, depth + 1), **i64),
        target_logits.new_empty((batch, depth + 1), **i64),
        *(target_logits.new_empty((batch, nodes), **f32) for _ in range(5)),
        target_logits.new_empty((batch, nodes), **i64),
    )


def _register_ops():
    if _native.native_module() is not None and hasattr(torch.ops.fusedecode, "verify_tree"):
        torch.library.register_fake("fusedecode::verify_tree")(_fake_outputs)
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from .triton_kernels.verify_tree import verify_tree_triton

    @torch.library.custom_op("fusedecode::verify_tree_triton", mutates_args=())
    def _verify_tree_triton(target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor,
                            temperature: float, draft_probs: Optional[torch.Tensor], seeds: torch.Tensor,
                            depth: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
        return verify_tree_triton(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth)

    _verify_tree_triton.register_fake(_fake_outputs)


_register_ops()
