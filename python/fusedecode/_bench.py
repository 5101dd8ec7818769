"""Timing helpers shared by ``benchmarks/`` and ``python -m fusedecode demo``.

GPU (docs/performance.md#method): warm-up first; inputs rotated through enough copies that they do
not sit in L2; the calls for one measurement are captured in a CUDA graph so host overhead does not
leak into the kernel time; CUDA events around each replay; the median over replays. The floor is the
bytes read over the device-to-device copy bandwidth measured in the same run. CPU: median wall time
of calls cycling through the same inputs, every implementation in the same process.
"""

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time

import torch

import fusedecode


def minimal_torch_composite(logits):
    """What a user writes without fusedecode: separate torch ops, no masking/NaN handling, no topk.

    A benchmark baseline only (masked and NaN rows do not get docs/semantics.md#logit_stats's results);
    the reference composite is ``fusedecode.reference.logit_stats_reference``.
    """
    z = logits.float()
    logsumexp = torch.logsumexp(z, dim=-1)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    varentropy = (p * (log_p + entropy.unsqueeze(-1)) ** 2).sum(-1)
    self_certainty = logsumexp - z.mean(-1) - math.log(z.shape[-1])
    max_logprob, argmax = log_p.max(-1)
    return logsumexp, entropy, varentropy, self_certainty, max_logprob, argmax


def make_inputs(rows, vocab, dtype, device, copies, seed=0):
    """``copies`` random logit tensors (never zeros), realistic spread: N(0, 3^2) plus a few peaks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn((rows, vocab), generator=g, dtype=torch.float32) * 3.0
    peaks = torch.randint(0, vocab, (rows,), generator=g)
    base[torch.arange(rows), peaks] += 12.0
    base = base.to(device=device, dtype=dtype)
    out = [base]
    for i in range(1, copies):
        # Cheap distinct copies: roll each by a different amount (same statistics, different data).
        out.append(torch.roll(base, shifts=i * 7919, dims=-1).contiguous())
    return out


def copies_for_l2(bytes_per_input, device, cap_bytes=4 << 30, max_copies=512):
    """How many input copies make one rotation several times the L2 (at least 2)."""
    if torch.device(device).type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    wanted = math.ceil(4 * l2 / max(bytes_per_input, 1))
    fit = max(1, cap_bytes // max(bytes_per_input, 1))
    return int(max(2, min(wanted, fit, max_copies)))


def cuda_time_per_call(fn, inputs, replays=30, use_graph=True):
    """Median seconds per ``fn(x)`` call over ``replays``; each replay runs fn once per input."""
    torch.cuda.synchronize()
    for x in inputs[:3]:
        fn(x)  # warm-up: compilation, autotuning, workspace caches
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for x in inputs[:2]:
                    fn(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for x in inputs:
                    fn(x)
            graph.replay()
            torch.cuda.synchronize()
        except Exception:  # some implementations cannot be captured: fall back to plain launches
            graph = None
            torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for x in inputs:
                fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return statistics.median(times), graph is not None


def cuda_copy_bandwidth(device, nbytes=2 << 30, replays=20):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def cuda_empty_launch_time(device, calls=200, replays=30):
    """Seconds per empty kernel launch (torch.cuda._sleep(0)), timed like the ops (graph replay)."""
    dummy = [None] * calls
    seconds, _ = cuda_time_per_call(lambda _: torch.cuda._sleep(0), dummy, replays=replays)
    return seconds


def cpu_time_per_call(fn, inputs, min_time=0.3, repeats=7):
    """Median seconds per call on CPU; each repeat cycles through ``inputs`` until ``min_time``."""
    for x in inputs:
        fn(x)
    start = time.perf_counter()
    fn(inputs[0])
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(len(inputs), int(min_time / repeats / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(inputs[i % len(inputs)])
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def time_per_call(fn, inputs, device, replays=10):
    """(seconds per call, whether a CUDA graph was used) on ``device``."""
    if torch.device(device).type == "cuda":
        return cuda_time_per_call(fn, inputs, replays=replays)
    return cpu_time_per_call(fn, inputs, min_time=0.2, repeats=5), False


def git_commit(path=None):
    if os.environ.get("FUSEDECODE_COMMIT"):
        return os.environ["FUSEDECODE_COMMIT"]
    try:
        here = path or os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def run_metadata(device, **extra):
    """Date, commit, device name, versions and threads of a benchmark run (plus ``extra``)."""
    is_cuda = torch.device(device).type == "cuda"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if is_cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "fusedecode": fusedecode.build_info(),
        "threads": torch.get_num_threads(),
    }
    meta.update(extra)
    if is_cuda:
        meta["copy_bandwidth_GBps"] = cuda_copy_bandwidth(device) / 1e9
    return meta


def record(entry, report, json_path=None):
    """Append one result, print it as a JSON line, and rewrite ``json_path`` so a run cut short
    keeps what finished."""
    report["results"].append(entry)
    print(json.dumps(entry), flush=True)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(report, handle, indent=1)
