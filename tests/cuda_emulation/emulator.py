"""Python front end of the CUDA emulator (``build.py`` makes the library): runs the project's CUDA
launchers on CPU tensors through ctypes.

Every buffer a launcher sees lives in fenced memory (``fdemu_fenced_alloc``: a protected page on
each side, a canary in the rest of its pages), so an out-of-bounds read or write ends the call with
an ``EmulatorError`` naming the buffer. Outputs that the bindings allocate uninitialised
(``at::empty``), and the drivers' workspaces, start filled with a poison byte. ``every_memory`` runs a
call twice: buffers against their front guard with poison 0xFF (NaN, -1), then against their rear
guard with poison 0x7F (3.4e38, a large positive count), so that an overrun on either side faults and
a result built from memory no kernel wrote is garbage in at least one run.
"""

import ctypes
import functools
import os
import re
from typing import NamedTuple

import torch

from cuda_emulation.build import KERNEL_HEADERS
from fusedecode.ops.logit_stats import OUTPUTS as LOGIT_STATS_OUTPUTS
from fusedecode.ops.verify_tree import OUTPUTS as VERIFY_TREE_OUTPUTS

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ORDERS = {"ascending": 0, "descending": 1, "random": 2, "warps_ahead": 3}


class EmulatorError(RuntimeError):
    """The emulator stopped a call: deadlock, misused collective, memory fault, timeout, or a CUDA
    error returned by a launcher."""


class Schedule(NamedTuple):
    """In which order the emulator runs the runnable threads of a block, and the blocks of a grid."""

    lanes: str = "ascending"
    blocks: str = "ascending"
    seed: int = 0


class Memory(NamedTuple):
    """How one run lays out its buffers: each ending right at its rear guard page (``at_end``) or
    starting right after its front one, and the byte filling what the kernels must write."""

    at_end: bool = False
    poison: int = 0xFF


# The memory setups every emulated call runs in (see the module docstring). Moving the buffers also
# moves the rows against the 16-byte grid, so the kernels' scalar heads and tails change between runs.
RUNS = (Memory(at_end=False, poison=0xFF), Memory(at_end=True, poison=0x7F))

_P = ctypes.c_void_p
_I64 = ctypes.c_int64

# The C++ list of logit_stats' outputs, which the drivers expand into their call structs and
# StatsOutputPointers: the ctypes structs below are built from the same lines, so the three agree
# by construction. tests/cuda_emulation/test_emulator_runtime.py checks it against the Python table.
STATS_OUTPUTS_HEADER = os.path.join(KERNEL_HEADERS, "stats_outputs.h")
_LIST_DEFINITION = "#define FUSEDECODE_LOGIT_STATS_OUTPUTS(X)"
_LIST_ENTRY = re.compile(r"X\(\s*(\w+)\s*,\s*([\w:]+)\s*,\s*(\w+)\s*\)")


class CppOutput(NamedTuple):
    """One X(name, type, requested_by) line of FUSEDECODE_LOGIT_STATS_OUTPUTS."""

    name: str
    type: str  # the C++ element type: float, int64_t
    requested_by: str  # always, token_ids or topk (RequestedBy)


@functools.lru_cache(maxsize=None)
def cpp_stats_outputs(header=STATS_OUTPUTS_HEADER):
    """FUSEDECODE_LOGIT_STATS_OUTPUTS of ``header``, in order: the macro's continuation lines, each
    holding one X(...) entry (anything else there is an error, so that no entry is skipped)."""
    with open(header, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip().rstrip("\\").rstrip() == _LIST_DEFINITION]
    if len(starts) != 1:
        raise ValueError(f"{header}: expected one line '{_LIST_DEFINITION} \\', found {len(starts)}")
    entries = []
    index = starts[0]
    while lines[index].rstrip().endswith("\\"):
        index += 1
        line = lines[index].rstrip().rstrip("\\").strip()
        match = _LIST_ENTRY.fullmatch(line)
        if match is None:
            raise ValueError(f"{header}:{index + 1}: not an X(name, type, requested_by) entry: {line!r}")
        entries.append(CppOutput(*match.groups()))
    if not entries:
        raise ValueError(f"{header}: FUSEDECODE_LOGIT_STATS_OUTPUTS lists no output")
    return tuple(entries)


class _CallTypes(NamedTuple):
    logit_stats: type
    verify_tree: type


def _strict_call(structure, **members):
    """``structure(**members)``, refusing a name that is not one of its members (ctypes would keep
    it as a plain attribute and leave the member a null pointer)."""
    unknown = set(members) - {name for name, _ in structure._fields_}
    if unknown:
        raise TypeError(f"{structure.__name__} has no member(s) {sorted(unknown)}")
    return structure(**members)


@functools.lru_cache(maxsize=None)
def call_types():
    """The ctypes twins of the drivers' LogitStatsCall and VerifyTreeCall, member for member: their
    output pointers are the C++ list's entries (all of them; verify_tree only those every call
    computes), where the drivers expand FUSEDECODE_LOGIT_STATS_OUTPUTS."""
    outputs = cpp_stats_outputs()
    every_output = [(o.name, _P) for o in outputs]
    always_outputs = [(o.name, _P) for o in outputs if o.requested_by == "always"]

    class LogitStatsCall(ctypes.Structure):
        """LogitStatsCall of drivers/logit_stats_driver.cpp."""

        _fields_ = [("dtype", ctypes.c_int32), ("topk", ctypes.c_int32), ("logits", _P), ("outer_size", _I64),
                    ("inner_size", _I64), ("outer_stride", _I64), ("inner_stride", _I64), ("vocab", _I64),
                    ("temperatures", _P), ("temperature", ctypes.c_double), ("token_ids", _P), ("splits", _I64),
                    ("vectors_per_split", _I64)] + every_output

    class VerifyTreeCall(ctypes.Structure):
        """VerifyTreeCall of drivers/verify_tree_driver.cpp."""

        _fields_ = [("dtype", ctypes.c_int32), ("prob_dtype", ctypes.c_int32), ("logits", _P), ("batch", _I64),
                    ("nodes", _I64), ("vocab", _I64), ("stride_b", _I64), ("stride_n", _I64), ("tokens", _P),
                    ("parents", _P), ("seeds", _P), ("temperature", ctypes.c_double), ("draft_probs", _P),
                    ("q_stride_b", _I64), ("q_stride_n", _I64)] + always_outputs + \
            [("num_accepted", _P), ("accepted_nodes", _P), ("output_tokens", _P), ("width", _I64)]

    return _CallTypes(LogitStatsCall, VerifyTreeCall)


class _ProbeCall(ctypes.Structure):
    """ProbeCall of drivers/probes.cu, field for field."""

    _fields_ = [("probe", ctypes.c_int32), ("threads", ctypes.c_int32), ("blocks", ctypes.c_int32),
                ("arg", ctypes.c_int32), ("width", _I64), ("n", _I64), ("buffer", _P), ("input", _P),
                ("counter", _P), ("out", _P), ("cuda_error", _I64)]


class FencedArena:
    """Tensors in fenced memory, freed together (``with`` block)."""

    def __init__(self, library, at_end, poison):
        self._library = library
        self.at_end = at_end
        self.poison = poison
        self._pointers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for pointer in self._pointers:
            self._library.fdemu_fenced_free(pointer)
        self._pointers = []

    def _raw(self, nbytes):
        pointer = self._library.fdemu_fenced_alloc(nbytes, int(self.at_end))
        if not pointer:
            raise MemoryError(f"fenced allocation of {nbytes} bytes failed")
        self._pointers.append(pointer)
        return pointer

    def _tensor(self, shape, stride, dtype):
        """Uninitialised tensor of ``shape`` and ``stride`` whose storage is exactly the span the
        strides reach (at least one element, so that it has an address)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        span = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 1
        nbytes = span * itemsize
        buffer = (ctypes.c_uint8 * nbytes).from_address(self._raw(nbytes))
        flat = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)
        return flat.as_strided(shape, stride)

    def copy(self, tensor):
        """A copy of ``tensor`` (CPU) with the same shape and strides."""
        if any(step < 0 for step in tensor.stride()):
            raise ValueError("negative strides are not supported")
        out = self._tensor(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        out.copy_(tensor)
        return out

    def output(self, shape, dtype, fill=None):
        """A contiguous output: filled with ``fill``, or with the poison byte when None."""
        stride = torch.empty(shape, dtype=torch.uint8).stride()
        out = self._tensor(tuple(shape), stride, dtype)
        if fill is not None:
            out.fill_(fill)
        elif out.numel():
            out.view(torch.uint8).fill_(self.poison)
        return out


def _pointer(tensor):
    return tensor.data_ptr() if tensor is not None else None


class Emulator:
    """The emulator library, loaded."""

    def __init__(self, path):
        library = ctypes.CDLL(path)
        library.fdemu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                            ctypes.c_double]
        library.fdemu_last_error.restype = ctypes.c_char_p
        library.fdemu_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        library.fdemu_fenced_alloc.argtypes = [ctypes.c_uint64, ctypes.c_int]
        library.fdemu_fenced_alloc.restype = _P
        library.fdemu_fenced_free.argtypes = [_P]
        self.call_types = call_types()
        library.fdemu_logit_stats.argtypes = [ctypes.POINTER(self.call_types.logit_stats)]
        library.fdemu_verify_tree.argtypes = [ctypes.POINTER(self.call_types.verify_tree)]
        library.fdemu_probe.argtypes = [ctypes.POINTER(_ProbeCall)]
        library.fdemu_convert.argtypes = [ctypes.c_int, _P, _P, _I64]
        library.fdemu_philox_uniform.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32]
        library.fdemu_philox_uniform.restype = ctypes.c_float
        self.library = library
        self.path = path
        self.schedule = Schedule()
        self.timeout_s = 300.0

    def _configure(self, poison):
        s = self.schedule
        self.library.fdemu_configure(ORDERS[s.lanes], ORDERS[s.blocks], s.seed, poison, self.timeout_s)

    def _check(self, rc):
        if rc != 0:
            raise EmulatorError(self.library.fdemu_last_error().decode())

    def counters(self, reset=False):
        """Launches, blocks, thread switches, block barriers and warp collectives since the last reset."""
        values = (ctypes.c_uint64 * 5)()
        self.library.fdemu_counters(values, int(reset))
        return dict(zip(("launches", "blocks", "switches", "block_barriers", "warp_collectives"), values))

    def arena(self, memory):
        return FencedArena(self.library, memory.at_end, memory.poison)

    # --------------------------------------------------------------------------------------------
    # logit_stats

    def logit_stats(self, logits, temperature, token_ids, topk, splits, vectors_per_split=0, memory=Memory()):
        """``launch_logit_stats`` on ``logits`` viewed as ``[outer, inner, V]`` (the custom op's
        layout), ``splits`` CTAs per row. ``temperature``: a float or float32 ``[rows]``. Returns the
        outputs by name (CPU copies; None for those not asked for)."""
        outer, inner, vocab = logits.shape
        rows = outer * inner
        requested = {"token_ids": token_ids is not None, "topk": topk > 0}
        self._configure(memory.poison)
        with self.arena(memory) as arena:
            x = arena.copy(logits)
            per_row = arena.copy(temperature.float().contiguous()) if isinstance(temperature, torch.Tensor) else None
            ids = arena.copy(token_ids.to(torch.int64).contiguous()) if token_ids is not None else None
            outputs = {o.name: arena.output((rows,), o.dtype, o.fill) if o.requested_by is None or
                       requested[o.requested_by] else None for o in LOGIT_STATS_OUTPUTS}
            call = _strict_call(
                self.call_types.logit_stats,
                dtype=DTYPE_CODES[logits.dtype], topk=topk, logits=x.data_ptr(), outer_size=outer,
                inner_size=inner, outer_stride=x.stride(0), inner_stride=x.stride(1), vocab=vocab,
                temperatures=_pointer(per_row), temperature=0.0 if per_row is not None else float(temperature),
                token_ids=_pointer(ids), splits=splits, vectors_per_split=vectors_per_split,
                **{name: _pointer(t) for name, t in outputs.items()})
            self._check(self.library.fdemu_logit_stats(ctypes.byref(call)))
            return {name: t.clone() if t is not None else None for name, t in outputs.items()}

    # --------------------------------------------------------------------------------------------
    # verify_tree

    def verify_tree(self, logits, tokens, parents, temperature, draft_probs, seeds, depth, memory=Memory()):
        """``launch_verify_tree`` with the custom op's arguments (``tokens``, ``parents`` int64
        ``[B, N]``, ``seeds`` int64 ``[B]``). Returns the outputs by name (CPU copies)."""
        batch, nodes, vocab = logits.shape
        sizes = {"batch": batch, "nodes": nodes, "width": depth + 1}
        self._configure(memory.poison)
        with self.arena(memory) as arena:
            x = arena.copy(logits)
            q = arena.copy(draft_probs) if draft_probs is not None else None
            token_rows = arena.copy(tokens.to(torch.int64).contiguous())
            parent_rows = arena.copy(parents.to(torch.int64).contiguous())
            seed_rows = arena.copy(seeds.to(torch.int64).contiguous())
            outputs = {o.name: arena.output(tuple(sizes[d] for d in o.shape), o.dtype, o.fill)
                       for o in VERIFY_TREE_OUTPUTS}
            call = _strict_call(
                self.call_types.verify_tree,
                dtype=DTYPE_CODES[logits.dtype], prob_dtype=DTYPE_CODES[q.dtype] if q is not None else 0,
                logits=x.data_ptr(), batch=batch, nodes=nodes, vocab=vocab, stride_b=x.stride(0),
                stride_n=x.stride(1), tokens=token_rows.data_ptr(), parents=parent_rows.data_ptr(),
                seeds=seed_rows.data_ptr(), temperature=float(temperature), draft_probs=_pointer(q),
                q_stride_b=q.stride(0) if q is not None else 0, q_stride_n=q.stride(1) if q is not None else 0,
                width=depth + 1, **{name: t.data_ptr() for name, t in outputs.items()})
            self._check(self.library.fdemu_verify_tree(ctypes.byref(call)))
            return {name: t.clone() for name, t in outputs.items()}

    # --------------------------------------------------------------------------------------------
    # runtime probes (drivers/probes.cu)

    def probe(self, probe, threads, blocks=1, arg=0, width=32, out_size=None, input=None, buffer=None,
              memory=Memory()):
        """Run probe kernel number ``probe``; returns (out, buffer after, CUDA error code)."""
        self._configure(memory.poison)
        with self.arena(memory) as arena:
            out = arena.output((out_size or 4 * threads * blocks,), torch.int64, fill=-7)
            given = arena.copy(input) if input is not None else None
            work = arena.copy(buffer) if buffer is not None else None
            counter = arena.output((1,), torch.int32, fill=0)
            n = input.numel() if input is not None else (buffer.numel() if buffer is not None else 0)
            call = _ProbeCall(probe=probe, threads=threads, blocks=blocks, arg=arg, width=width, n=n,
                              buffer=_pointer(work), input=_pointer(given), counter=counter.data_ptr(),
                              out=out.data_ptr())
            self._check(self.library.fdemu_probe(ctypes.byref(call)))
            return out.clone(), work.clone() if work is not None else None, call.cuda_error

    def uniform(self, seed, row, node, purpose):
        """verify_tree's draw for (seed, batch row, node, purpose): 0 sample, 1 accept (philox.h)."""
        return self.library.fdemu_philox_uniform(seed % 2**64, row, node, purpose)

    def convert(self, kind, values):
        """The emulator's 16-bit conversions: 0 half->float, 1 bfloat16->float (``values`` int16
        bit patterns), 2 float->half, 3 float->bfloat16 (``values`` float32; returns int16 bits)."""
        values = values.contiguous()
        out = torch.empty(values.shape, dtype=torch.float32 if kind < 2 else torch.int16)
        self.library.fdemu_convert(kind, values.data_ptr(), out.data_ptr(), values.numel())
        return out


def every_memory(run, runs=RUNS):
    """``run(memory)`` for every memory setup of ``runs``: the list of their results."""
    return [run(memory) for memory in runs]
