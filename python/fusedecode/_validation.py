"""The one place where fusedecode checks user arguments, before any kernel runs.

Type errors raise ``TypeError`` and bad values ``ValueError``, each naming the argument. Checks that
need the values of a CUDA tensor (token ids in range, temperatures positive) cost one host
synchronisation; they are skipped while ``torch.compile`` traces or a CUDA graph is being captured,
where the kernels instead turn such rows into NaN.
"""

import math
import numbers
import operator
import struct

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype. Both a TypeError (what Python code expects) and a
    ValueError (what DESIGN section 4 promises for every bad verify_tree input)."""

INDEX_DTYPES = (torch.int32, torch.int64)
MAX_TOPK = 64


def values_checkable(tensor):
    """False while tracing or capturing, where reading tensor values would break the graph."""
    if torch.compiler.is_compiling():
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_int(name, value, low, high=None):
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_float(name, value, low=-math.inf, high=math.inf, allow_infinite=False):
    """A real number (int or float, not bool) in [low, high]; never NaN; infinite only if allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or (not allow_infinite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'non-NaN' if allow_infinite else 'finite'} float, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_logits(name, logits):
    if not isinstance(logits, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{name} must have V >= 1 entries in its last dimension, got shape {tuple(logits.shape)}")
    if vocab >= 2**31:
        raise ValueError(f"{name}: V must be below 2^31, got {vocab}")
    if vocab > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got stride {logits.stride(-1)}")


# The kernels compute in float32 with inv_t = 1 / T: a temperature is valid when, rounded to float32,
# it is finite and > 0 and its reciprocal is finite too (about 3e-39 < T < 3.4e38).
TEMPERATURE_RANGE = "finite and > 0 with 1/temperature finite in float32 (about 3e-39 < T < 3.4e38)"


def _is_real_number(value):
    """A Python or NumPy real number (np.float32 included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _to_float32(value):
    """A Python float rounded to float32 (+-inf beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # some Pythons refuse to pack what rounds to inf
        return math.copysign(math.inf, value)


def float32_temperature_ok(value):
    """The temperature rule above for one Python number (no tensor ops: this runs on every call)."""
    t32 = _to_float32(value)
    return t32 > 0 and math.isfinite(t32) and math.isfinite(_to_float32(1.0 / t32))


def temperature_in_float32_range(temperature):
    """The temperature rule above, entry by entry, for a floating-point tensor (any dtype)."""
    t32 = temperature.to(torch.float32)
    return torch.isfinite(t32) & (t32 > 0) & torch.isfinite(1.0 / t32)


def check_temperature(temperature, logits, allow_zero=False):
    """Returns (per-row float32 tensor or None, scalar float)."""
    rows_shape = logits.shape[:-1]
    bound = ("0 or " if allow_zero else "") + TEMPERATURE_RANGE
    if isinstance(temperature, torch.Tensor):
        if not temperature.dtype.is_floating_point:
            raise ArgumentTypeError(f"temperature must be a float or a floating-point tensor, got {temperature.dtype}")
        if temperature.shape != rows_shape:
            raise ValueError(f"temperature tensor must have shape {tuple(rows_shape)} (one per row), "
                             f"got {tuple(temperature.shape)}")
        if temperature.device != logits.device:
            raise ValueError(f"temperature is on {temperature.device} but logits are on {logits.device}")
        if values_checkable(temperature):
            ok = temperature_in_float32_range(temperature)
            if allow_zero:
                ok |= temperature == 0
            if not bool(ok.all()):
                bad = temperature[~ok].reshape(-1)[0].item()
                raise ValueError(f"temperature must be {bound} in every row, got {bad}")
        return temperature.reshape(-1).to(torch.float32).contiguous(), 1.0
    if not _is_real_number(temperature):
        raise ArgumentTypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not ((allow_zero and temperature == 0) or float32_temperature_ok(temperature)):
        raise ValueError(f"temperature must be {bound}, got {temperature}")
    return None, temperature


def check_token_ids(token_ids, logits):
    if token_ids is None:
        return None
    if not isinstance(token_ids, torch.Tensor):
        raise ArgumentTypeError(f"token_ids must be a tensor or None, got {type(token_ids).__name__}")
    if token_ids.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    rows_shape = logits.shape[:-1]
    if token_ids.shape != rows_shape:
        raise ValueError(f"token_ids must have shape {tuple(rows_shape)} (one per row), got {tuple(token_ids.shape)}")
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids is on {token_ids.device} but logits are on {logits.device}")
    vocab = logits.shape[-1]
    if token_ids.numel() and values_checkable(token_ids):
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"token_ids must be in [0, {vocab}), got values in [{low}, {high}]")
    return token_ids.reshape(-1).to(torch.int64).contiguous()


def check_logit_stats_args(logits, temperature, token_ids, topk):
    """Validate logit_stats arguments; returns (temperature_tensor, temperature_scalar, token_ids, topk)."""
    check_logits("logits", logits)
    temperature_tensor, temperature_scalar = check_temperature(temperature, logits)
    token_ids = check_token_ids(token_ids, logits)
    topk = check_int("topk", topk, 0, MAX_TOPK)
    return temperature_tensor, temperature_scalar, token_ids, topk


def check_tree_parents(parents, name="parents"):
    """A draft tree as ``parents`` ``[N]`` or ``[B, N]`` (int64): ``parents[0] == -1`` and
    ``0 <= parents[i] < i`` for every other node, which rules out cycles, self-parents, a second
    root and out-of-range parents. ``ValueError`` naming the first bad node otherwise. Reads the
    values (one synchronisation for CUDA tensors)."""
    nodes = parents.shape[-1]
    rows = parents.reshape(-1, nodes)
    index = torch.arange(nodes, device=parents.device)
    bad = (rows < 0) | (rows >= index)
    bad[:, 0] = rows[:, 0] != -1
    if not bool(bad.any()):
        return
    row, node = (int(v) for v in torch.nonzero(bad)[0])
    value = int(rows[row, node])
    where = f" in row {row}" if parents.dim() == 2 else ""
    if node == 0:
        raise ValueError(f"{name}: the root (node 0) must have parent -1, got {value}{where}")
    raise ValueError(f"{name} must satisfy parents[0] == -1 and 0 <= parents[i] < i for i >= 1 (a tree in "
                     f"topological order: no cycle or self-parent): node {node} has parent {value}{where}")


def check_verify_tree_args(target_logits, draft_tokens, parents, temperature, draft_probs, seed, validate):
    """Validate verify_tree arguments (DESIGN section 4).

    Returns ``(draft_tokens [B, N] int64, parents [B, N] int64, seeds [B] int64, depth, temperature)``,
    tensors on the logits' device. Value checks on CUDA tensors cost one synchronisation; ``validate=False`` skips
    them (and then, for CUDA-resident parents, ``depth`` is the largest possible, N - 1).
    """
    check_logits("target_logits", target_logits)
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must have shape [B, N, V], got {tuple(target_logits.shape)}")
    batch, nodes, vocab = target_logits.shape
    if nodes < 1:
        raise ValueError("target_logits must have N >= 1 nodes (node 0 is the root)")
    device = target_logits.device

    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dtype not in INDEX_DTYPES:
        raise ValueError(f"draft_tokens must be an int32/int64 tensor, got "
                         f"{getattr(draft_tokens, 'dtype', type(draft_tokens).__name__)}")
    if draft_tokens.shape != (batch, nodes):
        raise ValueError(f"draft_tokens must have shape [B, N] = {(batch, nodes)}, got {tuple(draft_tokens.shape)}")
    if draft_tokens.device != device:
        raise ValueError(f"draft_tokens is on {draft_tokens.device} but target_logits are on {device}")

    if not isinstance(parents, torch.Tensor) or parents.dtype not in INDEX_DTYPES:
        raise ValueError(f"parents must be an int32/int64 tensor, got "
                         f"{getattr(parents, 'dtype', type(parents).__name__)}")
    if parents.shape not in ((nodes,), (batch, nodes)):
        raise ValueError(f"parents must have shape [N] = ({nodes},) or [B, N] = {(batch, nodes)}, "
                         f"got {tuple(parents.shape)}")

    if not _is_real_number(temperature):
        raise ValueError(f"temperature must be a float >= 0, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (temperature == 0 or float32_temperature_ok(temperature)):
        raise ValueError(f"temperature must be 0 (greedy) or {TEMPERATURE_RANGE}, got {temperature}")

    if draft_probs is not None:
        if not isinstance(draft_probs, torch.Tensor) or draft_probs.dtype not in FLOAT_DTYPES:
            raise ValueError(f"draft_probs must be a float32/float16/bfloat16 tensor, got "
                             f"{getattr(draft_probs, 'dtype', type(draft_probs).__name__)}")
        if draft_probs.dim() != 3 or draft_probs.shape[:2] != (batch, nodes):
            raise ValueError(f"draft_probs must have shape [B, N, V] = {(batch, nodes, vocab)}, "
                             f"got {tuple(draft_probs.shape)}")
        if draft_probs.shape[2] != vocab:
            raise ValueError(f"draft_probs has V = {draft_probs.shape[2]} but target_logits have V = {vocab}")
        if draft_probs.device != device:
            raise ValueError(f"draft_probs is on {draft_probs.device} but target_logits are on {device}")
        if vocab > 1 and draft_probs.stride(-1) != 1:
            raise ValueError("draft_probs: the last dimension must be contiguous (stride 1)")

    seeds = _check_seed(seed, batch, device)

    parents_rows = parents.to(torch.int64).expand(batch, nodes)
    if validate and values_checkable(parents) and values_checkable(draft_tokens):
        check_tree_parents(parents.to(torch.int64))
        if nodes > 1 and batch > 0:
            drafted = draft_tokens[:, 1:]
            low, high = int(drafted.min()), int(drafted.max())
            if low < -1 or high >= vocab:
                raise ValueError(f"draft_tokens must be in [-1, {vocab}) (entry 0 is ignored), "
                                 f"got values in [{low}, {high}]")

    if values_checkable(parents) and (parents.device.type == "cpu" or validate):
        from .tree import reachable_depths

        # The depth of what the walk can reach, which for an unvalidated tree skips the nodes whose
        # parent is out of range or not before them (never an IndexError).
        reachable = reachable_depths(parents.to(torch.int64).cpu())
        depth = max(int(reachable.max()), 0) if reachable.numel() else 0
    else:
        depth = nodes - 1
    tokens = draft_tokens.to(torch.int64).contiguous()
    parents_out = parents_rows.to(device).contiguous()
    return tokens, parents_out, seeds, depth, temperature


def _check_seed(seed, batch, device):
    """One int64 seed per batch row, on ``device``. None draws from torch's default generator."""
    if seed is None:
        drawn = torch.randint(0, 2**62, (), dtype=torch.int64)
        return drawn.to(device).expand(batch).contiguous()
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise ValueError(f"seed tensor must be int64, got {seed.dtype}")
        if seed.shape not in ((), (batch,)):
            raise ValueError(f"seed tensor must have shape [] or [B] = [{batch}], got {tuple(seed.shape)}")
        return seed.to(device).expand(batch).contiguous()
    # Python or NumPy integers, as for topk; out of range is an error, never a silent wrap.
    seed = check_int("seed", seed, 0, 2**63 - 1)
    return torch.full((batch,), seed, dtype=torch.int64, device=device)


def check_linear_ce_args(hidden, weight, targets, delta, temperature, ignore_index, chunk):
    """Validate ``linear_cross_entropy_entropy`` arguments.

    ``hidden`` is ``[T, H]`` or ``[B, T, H]`` (float64 is accepted for the torch backend), ``weight``
    ``[V, H]`` of the same dtype, ``targets`` int64 of hidden's leading shape, ``delta`` None, ``[H]``
    or (batched) ``[B, H]`` of hidden's dtype or float32. Target values are checked on CPU only: on a GPU it
    would cost a synchronisation, and the kernels turn an out-of-range target into a NaN loss instead.
    Returns ``(temperature, ignore_index, chunk)`` normalised (chunk None or an int >= 1).
    """
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ArgumentTypeError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape [T, H] or [B, T, H], got {tuple(hidden.shape)}")
    *_, tokens, width = hidden.shape
    if tokens < 1:
        raise ValueError(f"hidden must have T >= 1 rows, got shape {tuple(hidden.shape)}")
    if hidden.dim() == 3 and hidden.shape[0] < 1:
        raise ValueError(f"hidden must have B >= 1 batch entries, got shape {tuple(hidden.shape)}")

    if weight.dtype != hidden.dtype:
        raise ArgumentTypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must have shape [V, H] with H = {width} (hidden's last dim), got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have V >= 1 rows")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")

    if targets.dtype != torch.int64:
        raise ArgumentTypeError(f"targets must be int64, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                         f"got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")

    if delta is not None:
        if not isinstance(delta, torch.Tensor):
            raise ArgumentTypeError(f"delta must be a tensor or None, got {type(delta).__name__}")
        if delta.dtype not in (hidden.dtype, torch.float32):
            raise ArgumentTypeError(f"delta must have hidden's dtype {hidden.dtype} or float32, got {delta.dtype}")
        shapes = [(width,)] + ([(hidden.shape[0], width)] if hidden.dim() == 3 else [])
        if tuple(delta.shape) not in shapes:
            raise ValueError(f"delta must have shape {' or '.join(map(str, shapes))}, got {tuple(delta.shape)}")
        if delta.device != hidden.device:
            raise ValueError(f"delta is on {delta.device} but hidden is on {hidden.device}")

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ArgumentTypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    ignore_index = check_int("ignore_index", ignore_index, -2**63, 2**63 - 1)
    if chunk is not None:
        chunk = check_int("chunk", chunk, 1, 2**31 - 1)

    if targets.device.type == "cpu" and values_checkable(targets):
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                             f"got {int(targets[bad][0])}")
    return temperature, ignore_index, chunk
