"""The statistics channel from the vLLM worker (where the processor runs) to the calling process.

vLLM gives a logits processor no way to hand data back with a request's output, and the worker is a
grandchild of the caller in the default multi-process engine. So the caller owns a private channel
and every request that wants statistics says where it is (``fusedecode_channel`` and
``fusedecode_authkey`` in ``extra_args``):

- Caller (``StatsCollector``): a directory made by ``tempfile.mkdtemp`` (mode 0700, named
  ``fusedecode-vllm-*``) holding one AF_UNIX socket served by ``multiprocessing.connection.Listener``
  with a random 32-byte authkey (HMAC challenge in both directions). Nothing is written to disk and
  no port is opened; a peer whose uid differs is dropped (SO_PEERCRED). Reader threads only queue the
  raw messages (they share the GIL with vLLM's output processing); ``take`` sorts them into traces.
  ``close`` (also at exit, and on leaving a ``with`` block) removes the directory.
- Worker (``StatsSender``): connects only to a socket owned by its own uid inside a
  ``fusedecode-vllm-*`` directory owned by that uid with no group/other permission (``extra_args``
  can come from remote clients of a server: the worker must not be pointed at anything else), then
  sends one message per engine step: a JSON header and the step's records.

Records are matched to completions by content at the caller (see ``StatsCollector.take``), because
a request's ``n`` completions share one ``extra_args`` and the processor is not told request ids.
"""

import atexit
import json
import os
import secrets
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Client, Listener

import numpy as np

from ..ops.logit_stats import float_outputs
from ._options import AUTHKEY, AUTHKEY_BYTES, CHANNEL, KEY

DIR_PREFIX = "fusedecode-vllm-"
SOCKET_NAME = "stats.sock"
# Every per-token statistic of logit_stats' output table (token_logprob of the emitted token;
# topk_confidence NaN when not asked for).
STAT_FIELDS = float_outputs("token_ids", "topk")
# One record per generated token: 16 bytes of identity; reflection insertion: the token the rule forced
# (-1: none) and, on an insertion's first token, the index of the trigger that fired (else -1), the
# value that fired it and the threshold (float64, NaN elsewhere); then one float32 per statistic
# (76 bytes today).
RECORD = np.dtype([("uid", "<i8"), ("position", "<i4"), ("token", "<i4"), ("forced", "<i4"), ("insertion", "<i4"),
                   ("insertion_value", "<f8"), ("insertion_threshold", "<f8")]
                  + [(name, "<f4") for name in STAT_FIELDS])
_HEADER_LENGTH = struct.Struct("<I")
_MAX_MESSAGE = 1 << 30


def encode_message(header, records):
    """One wire message: header length, JSON header, then the raw records."""
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER_LENGTH.pack(len(header_bytes)) + header_bytes + records.astype(RECORD, copy=False).tobytes()


def decode_message(message):
    """(header dict, records array) of one wire message."""
    (length,) = _HEADER_LENGTH.unpack_from(message)
    start = _HEADER_LENGTH.size
    header = json.loads(message[start:start + length])
    return header, np.frombuffer(message, dtype=RECORD, offset=start + length)


def _peer_uid(connection):
    """The uid of the process at the other end of an AF_UNIX connection (None if unknown)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    sock = socket.socket(fileno=os.dup(connection.fileno()))
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        return uid
    finally:
        sock.close()


# ------------------------------------------------------------------------------------ worker side
def check_channel_path(path):
    """Raise ``ValueError`` unless ``path`` is a socket of this user in a private fusedecode directory."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(f"{CHANNEL} must be an absolute path, got {path!r}")
    directory = os.path.dirname(path)
    if not os.path.basename(directory).startswith(DIR_PREFIX):
        raise ValueError(f"{CHANNEL} {path!r} is not inside a {DIR_PREFIX}* directory")
    uid = os.geteuid()
    try:
        directory_info, socket_info = os.lstat(directory), os.lstat(path)
    except OSError as error:
        raise ValueError(f"{CHANNEL} {path!r}: {error.strerror}") from None
    if (not stat.S_ISDIR(directory_info.st_mode) or directory_info.st_uid != uid
            or stat.S_IMODE(directory_info.st_mode) != 0o700):
        raise ValueError(f"{CHANNEL} directory {directory!r} is not a mode-0700 directory owned by uid {uid}")
    if not stat.S_ISSOCK(socket_info.st_mode) or socket_info.st_uid != uid:
        raise ValueError(f"{CHANNEL} {path!r} is not a socket owned by uid {uid}")


class StatsSender:
    """Worker end of one channel: ``send`` writes one message (normally once per engine step)."""

    def __init__(self, path, authkey):
        check_channel_path(path)
        if not isinstance(authkey, bytes) or len(authkey) != AUTHKEY_BYTES:
            raise ValueError(f"{AUTHKEY} must be {AUTHKEY_BYTES} bytes")
        self.path = path
        self._connection = Client(path, family="AF_UNIX", authkey=authkey)
        peer = _peer_uid(self._connection)
        if peer is not None and peer != os.geteuid():
            self._connection.close()
            raise ValueError(f"{CHANNEL} {path!r} is served by uid {peer}, not {os.geteuid()}")

    def send(self, header, records):
        self._connection.send_bytes(encode_message(header, records))

    def close(self):
        self._connection.close()


# ------------------------------------------------------------------------------------ caller side
class _ReceivedTrace:
    """What the caller received for one worker-side trace: one request (or one of its n
    completions) from the position where that worker started recording it."""

    __slots__ = ("key", "chunks", "stopped_at", "_records")

    def __init__(self, key):
        self.key, self.chunks, self.stopped_at, self._records = key, [], None, None

    def add(self, records):
        self.chunks.append(records)
        self._records = None

    def records(self):
        """The records by position; where a position came twice (a step vLLM discarded and ran again),
        the later record."""
        if self._records is None:
            data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, RECORD)
            if len(data):
                data = data[np.argsort(data["position"], kind="stable")]
                last_of_position = np.r_[data["position"][1:] != data["position"][:-1], True]
                data = data[last_of_position]
            self._records, self.chunks = data, [data]
        return self._records

    def first_position(self):
        data = self.records()
        return int(data["position"][0]) if len(data) else None

    def reach(self, tokens, start):
        """How far this trace covers ``tokens`` from ``start``: the end of its run of consecutive
        positions start, start + 1, ... whose tokens agree with ``tokens`` (capped at len(tokens));
        ``start`` when it does not begin there."""
        data = self.records()
        if not len(data) or data["position"][0] != start:
            return start
        count = min(len(data), len(tokens) - start)
        consecutive = data["position"][:count] == np.arange(start, start + count)
        agrees = consecutive & (data["token"][:count] == tokens[start:start + count])
        return start + (count if agrees.all() else int(np.argmin(agrees)))


def _cover(tokens, free):
    """A chain of traces from ``free`` that covers positions 0..len(tokens)-1 with these tokens, in
    order, or None. Normally one trace; more when the request was recorded in pieces (resumed after
    preemption on another tensor-parallel rank, or after its worker forgot it). Among traces starting
    at the same position the one reaching furthest is taken."""
    chain, position = [], 0
    while position < len(tokens):
        reaches = [(trace.reach(tokens, position), index) for index, trace in enumerate(free)
                   if trace not in chain]
        best, index = max(reaches, default=(position, None))
        if best == position:
            return None
        chain.append(free[index])
        position = best
    return chain


class StatsCollector:
    """Caller end of the channel. Use one per process (``fusedecode.vllm.generate`` makes a default
    one) or as a context manager; ``close`` removes its directory (also at interpreter exit)."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix=DIR_PREFIX)  # mode 0700
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self._authkey = secrets.token_bytes(AUTHKEY_BYTES)
        self._listener = Listener(self.path, family="AF_UNIX", authkey=self._authkey)
        os.chmod(self.path, 0o600)
        self._lock = threading.Condition()
        self._inbox = []  # raw messages, sorted into traces by take()
        self._open_keys = set()
        self._traces = {}  # (worker pid, uid) -> _ReceivedTrace
        self._by_key = {}  # key -> [(pid, uid)]
        self._errors = {}  # key -> message from a worker that could not serve it
        self._connections = []
        self.closed = False
        self.bytes_received = 0
        threading.Thread(target=self._accept, daemon=True, name="fusedecode-vllm-accept").start()
        atexit.register(_close_at_exit, weakref.ref(self))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def extra_args(self, key):
        """The ``extra_args`` entries that send a request's statistics here under ``key``."""
        return {KEY: key, CHANNEL: self.path, AUTHKEY: self._authkey.hex()}

    # -- receiving
    def _accept(self):
        while not self.closed:
            try:
                connection = self._listener.accept()  # the authkey handshake happens here
            except Exception:  # closed, or a peer that failed the handshake
                if self.closed:
                    return
                continue
            if self.closed or _peer_uid(connection) not in (None, os.getuid()):
                connection.close()
                continue
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True, name="fusedecode-vllm-read").start()

    def _read(self, connection):
        while True:
            try:
                message = connection.recv_bytes(_MAX_MESSAGE)
            except (EOFError, OSError):
                return
            with self._lock:
                self.bytes_received += len(message)
                self._inbox.append(message)
                self._lock.notify_all()

    def _sort_inbox(self):
        """Move the queued messages into their traces (one concatenate and sort for all records)."""
        inbox, self._inbox = self._inbox, []
        owners, chunks = [], []
        for message in inbox:
            header, records = decode_message(message)
            pid = header["pid"]
            for uid, key in header.get("new", {}).items():
                ident = (pid, int(uid))
                if key in self._open_keys and ident not in self._traces:  # others were released (or never asked here)
                    self._traces[ident] = _ReceivedTrace(key)
                    self._by_key[key].append(ident)
            for uid, position in header.get("stopped", {}).items():
                trace = self._traces.get((pid, int(uid)))
                if trace is not None:
                    trace.stopped_at = position
            for key, error in header.get("errors", {}).items():
                if key in self._open_keys:
                    self._errors[key] = error
            if len(records):
                owners.append(np.full(len(records), pid, np.int64))
                chunks.append(records)
        if not chunks:
            return
        pids, records = np.concatenate(owners), np.concatenate(chunks)
        order = np.lexsort((records["uid"], pids))
        pids, records = pids[order], records[order]
        cuts = np.flatnonzero((pids[1:] != pids[:-1]) | (records["uid"][1:] != records["uid"][:-1])) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(records)]):
            trace = self._traces.get((int(pids[start]), int(records["uid"][start])))
            if trace is not None:  # late records of a released key are dropped
                trace.add(records[start:stop])

    # -- the caller's API
    def open_keys(self, count):
        """``count`` fresh keys whose statistics will be kept until ``release``."""
        keys = [secrets.token_hex(8) for _ in range(count)]
        with self._lock:
            for key in keys:
                self._open_keys.add(key)
                self._by_key[key] = []
        return keys

    def release(self, keys):
        """Forget these keys and everything received for them (late records are dropped)."""
        with self._lock:
            self._sort_inbox()
            for key in keys:
                self._open_keys.discard(key)
                self._errors.pop(key, None)
                for ident in self._by_key.pop(key, ()):
                    self._traces.pop(ident, None)

    def _match(self, key, token_lists):
        """Per completion a chain of distinct traces whose records cover its tokens (see ``_cover``);
        None while some completion is not covered yet. Exact-length traces are tried first, then the
        longest completions first: a trace may run past its completion (a stop string is found by
        the frontend after the worker ran on), and a trace covering a completion covers every prefix
        of it."""
        free = [self._traces[ident] for ident in self._by_key.get(key, ())]
        chosen = [None] * len(token_lists)
        by_content = {}
        for trace in free:
            by_content.setdefault(trace.records()["token"].tobytes(), []).append(trace)
        for index, tokens in enumerate(token_lists):
            for candidate in by_content.get(tokens.tobytes(), ()):
                if candidate.reach(tokens, 0) == len(tokens) and len(tokens):
                    chosen[index] = [candidate]
                    by_content[tokens.tobytes()].remove(candidate)
                    break
        taken = {id(trace) for chain in chosen if chain for trace in chain}
        rest = [trace for trace in free if id(trace) not in taken]
        for index in sorted((i for i, c in enumerate(chosen) if c is None), key=lambda i: -len(token_lists[i])):
            chain = _cover(token_lists[index], rest)
            if chain is None:
                return None
            for trace in chain:
                rest.remove(trace)
            chosen[index] = chain
        return chosen

    @staticmethod
    def _joined(chain, tokens):
        """The records of a completion from its chain of traces, and whether the early stop ended it."""
        parts, position = [], 0
        for trace in chain:
            data = trace.records()
            end = trace.reach(tokens, position)
            parts.append(data[:end - position])
            position = end
        records = np.concatenate(parts) if parts else np.zeros(0, RECORD)
        last = chain[-1] if chain else None
        stopped = last is not None and last.stopped_at is not None and last.stopped_at == len(tokens) - 1
        return records, stopped

    def take(self, key, token_lists, *, timeout=120.0, poll=None):
        """Per completion (``token_lists``: the token ids vLLM returned, in order), its records and
        whether the early stop ended it. Waits until every completion is covered: the worker sends a
        token's record at the engine step after the token (see docs/vllm.md).

        ``poll`` is called while waiting (an in-process engine only runs that step when stepped).
        Raises ``TimeoutError`` after ``timeout`` seconds and ``RuntimeError`` if the worker refused.
        """
        deadline = time.monotonic() + timeout
        token_lists = [np.asarray(tokens, np.int32) for tokens in token_lists]
        with self._lock:
            while True:
                self._sort_inbox()
                if key in self._errors:
                    raise RuntimeError(f"fusedecode.vllm: the engine could not record statistics: {self._errors[key]}")
                chosen = self._match(key, token_lists)
                if chosen is not None:
                    return [self._joined(chain, tokens) for chain, tokens in zip(chosen, token_lists)]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    lengths = sorted(len(self._traces[i].records()) for i in self._by_key.get(key, ()))
                    raise TimeoutError(
                        f"fusedecode.vllm: statistics for {len(token_lists)} completion(s) did not arrive within "
                        f"{timeout} s (received {len(lengths)} trace(s) of lengths {lengths[:8]}; completion "
                        f"lengths {sorted(map(len, token_lists))[:8]}). Is FusedecodeLogitsProcessor loaded in the "
                        "engine? See the engine's log for fusedecode warnings.")
                if poll is None:
                    self._lock.wait(min(remaining, 0.05))
                else:
                    self._lock.release()
                    try:
                        poll()
                    finally:
                        self._lock.acquire()

    def trace_count(self, key):
        """How many worker-side traces arrived for ``key`` (n for a request with n completions)."""
        with self._lock:
            self._sort_inbox()
            return len(self._by_key.get(key, ()))

    def close(self):
        """Stop receiving and remove the directory (idempotent)."""
        if self.closed:
            return
        self.closed = True
        # Wake the accept thread (a listening socket's close does not) with a bare connection: its
        # handshake fails and the thread sees ``closed``. Not ``Client``, whose handshake would wait
        # forever if the thread had already seen ``closed`` and returned.
        waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            waker.connect(self.path)
        except OSError:
            pass
        finally:
            waker.close()
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                _shutdown(connection)  # wakes its reader thread with EOF
                connection.close()
            self._connections = []
        shutil.rmtree(self.directory, ignore_errors=True)


def _shutdown(connection):
    try:
        sock = socket.socket(fileno=os.dup(connection.fileno()))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _close_at_exit(reference):
    collector = reference()
    if collector is not None:
        collector.close()
