"""``fusedecode.verify_tree``: verification of a whole draft token tree, with per-node statistics.

The definitions are written once, in ``verify_tree``'s docstring below. Backends: ``torch``
(``reference.verify_tree_reference``, the oracle), ``cpp`` and ``cuda`` (the native op
``fusedecode::verify_tree``: schema in ``csrc/ops.cpp``, outputs in ``csrc/verify_tree_op.h``, the
walk shared by both in ``csrc/include/fusedecode/tree_walk.h``), ``triton``
(``fusedecode::verify_tree_triton``, kernels in ``triton_kernels/verify_tree.py``). The template of
``ops/logit_stats/`` (``ops/README.md``): output table in ``contract.py``, argument checks in ``checks.py``.
"""

import torch

from ... import _native
from ..._validation import check_no_grad, values_checkable
from ...backends import resolve_backend, triton_import_error
from ...tree import reachable_depths
from .._outputs import allocate, by_name
from ..logit_stats.contract import OUTPUTS as LOGIT_STATS_OUTPUTS
from ..logit_stats.contract import LogitStats
from .checks import check_verify_tree_args
from .contract import BACKENDS, OUTPUTS, SCHEMAS, STATS, WALK, TreeVerification
from .reference import verify_tree_reference

__all__ = ["verify_tree", "allocate_outputs"]

# ------------------------------------------------------------------------------------------------
# The public function


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
        draft_probs: optional ``[B, N, V]`` draft probabilities (multi-draft mode); only with
            ``temperature > 0``: greedy verification never reads them, so passing them with
            temperature 0 raises ValueError rather than being silently ignored.
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
        greedy), computed in the same pass. No gradients: ``target_logits`` or ``draft_probs`` that
        require grad while grad mode is on raise ValueError (``logit_stats`` is differentiable).

    Example::

        >>> import torch, fusedecode
        >>> tokens, parents = fusedecode.tree.tree_from_paths([[3, 1], [2]], root_token=0)
        >>> logits = torch.full((1, 4, 5), -5.0)
        >>> logits[0, 0, 3] = logits[0, 1, 1] = logits[0, 2, 4] = 5.0  # target wants 3, 1, 4
        >>> out = fusedecode.verify_tree(logits, tokens[None], parents)
        >>> out.num_accepted.tolist(), out.output_tokens.tolist()
        ([2], [[3, 1, 4]])
    """
    check_verify_tree_args(target_logits, draft_tokens, parents, temperature, draft_probs, seed, validate)
    check_no_grad("verify_tree", "the walk is discrete; logit_stats of the same logits is differentiable",
                  target_logits=target_logits, draft_probs=draft_probs)
    batch, nodes, _ = target_logits.shape
    device = target_logits.device
    temperature = float(temperature)
    tokens = draft_tokens.to(torch.int64).contiguous()
    parent_rows = parents.to(torch.int64).expand(batch, nodes).to(device).contiguous()
    seeds = _seed_rows(seed, batch, device)
    depth = _output_depth(parents, validate)
    name = resolve_backend(backend, device, BACKENDS)
    if name == "torch":
        return verify_tree_reference(target_logits, tokens, parent_rows, temperature, draft_probs, seeds, depth)

    op = torch.ops.fusedecode.verify_tree_triton if name == "triton" else torch.ops.fusedecode.verify_tree
    fields = by_name(OUTPUTS, op(target_logits, tokens, parent_rows, temperature, draft_probs, seeds, depth))
    stats = LogitStats(**{output.name: fields[output.name] for output in STATS})
    return TreeVerification(**{output.name: fields[output.name] for output in WALK}, stats=stats)


# ------------------------------------------------------------------------------------------------
# From the public arguments to the custom ops' arguments


def _seed_rows(seed, batch, device):
    """One int64 seed per batch row, on ``device``. None draws from torch's default generator."""
    if seed is None:
        drawn = torch.randint(0, 2**62, (), dtype=torch.int64)
        return drawn.to(device).expand(batch).contiguous()
    if isinstance(seed, torch.Tensor):
        return seed.to(device).expand(batch).contiguous()
    return torch.full((batch,), int(seed), dtype=torch.int64, device=device)


def _output_depth(parents, validate):
    """D, the tree depth that sizes ``accepted_nodes`` and ``output_tokens`` (D + 1 wide): the depth
    of what the walk can reach, when the tree can be read without an extra sync (CPU parents, or
    ``validate``, which reads them anyway); otherwise the largest possible, N - 1. For an
    unvalidated tree the reachable depth skips the nodes whose parent is out of range or not before
    them (never an IndexError)."""
    nodes = parents.shape[-1]
    if values_checkable(parents) and (parents.device.type == "cpu" or validate):
        reachable = reachable_depths(parents.to(torch.int64).cpu())
        return max(int(reachable.max()), 0) if reachable.numel() else 0
    return nodes - 1


# ------------------------------------------------------------------------------------------------
# Custom ops: the native op's fake kernel, and the Triton op


def allocate_outputs(target_logits, depth):
    """The ops' outputs by name (the fake kernel's result, and what the Triton kernels write into)."""
    batch, nodes = target_logits.shape[:2]
    return allocate(OUTPUTS, target_logits, {"batch": batch, "nodes": nodes, "width": depth + 1})


def _fake(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth):
    return tuple(allocate_outputs(target_logits, depth).values())


def _register_ops():
    if _native.native_module() is not None and hasattr(torch.ops.fusedecode, "verify_tree"):
        torch.library.register_fake("fusedecode::verify_tree")(_fake)
    if triton_import_error() is not None:
        return
    from ...triton_kernels.verify_tree import verify_tree_triton  # optional dependency: Triton

    def run_triton(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth):
        outputs = allocate_outputs(target_logits, depth)
        # The statistics pass writes every LogitStats field; those verify_tree does not return
        # (the optional ones, never asked for here) get empty tensors, as logit_stats gives them.
        empty = target_logits.new_empty((0,), dtype=torch.float32)
        stats = {output.name: outputs.get(output.name, empty) for output in LOGIT_STATS_OUTPUTS}
        verify_tree_triton(target_logits, draft_tokens, parents, temperature, draft_probs, seeds, depth, outputs,
                           stats)
        return tuple(outputs.values())

    op = torch.library.custom_op("fusedecode::verify_tree_triton", run_triton, mutates_args=(),
                                 schema=SCHEMAS["verify_tree_triton"])
    op.register_fake(_fake)


_register_ops()
