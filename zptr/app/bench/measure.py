"""Measurements of the machine and of one path: memory bandwidth, compute peak, peak RSS, the
bytes and multiply-adds of a token, spread and the noise flag."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# A figure whose spread (sd / median) exceeds this is flagged and never filed as a result.
NOISY_SPREAD = 0.10


def measure_bandwidth(threads: int, size_mb: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: best of ``repeats`` threaded sums of a ``size_mb`` buffer.

    A decoded token streams every weight once and writes next to nothing, so its ceiling is the
    read bandwidth. (A copy is a poor proxy: its write-allocate traffic is not in its byte count,
    and llama.cpp's f16 decode beat that "ceiling" by a third here.) numpy releases the GIL in a
    reduction, so ``threads`` slices are read in parallel as a multi-threaded decode reads them.
    """
    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    slices = [slice(i * len(data) // threads, (i + 1) * len(data) // threads) for i in range(threads)]
    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass is a warm-up
            start = time.perf_counter()
            list(pool.map(lambda s: data[s].sum(), slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_compute(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Float32 matrix-multiply peak in GFLOP/s with ``threads`` BLAS threads, best of
    ``repeats``: the compute ceiling a prefill (a batch of tokens, compute-bound) can reach."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = math.inf
    with threadpool_limits(threads, user_api="blas"):
        a @ a  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def gguf_token_cost(path: Path) -> tuple[int, int]:
    """(weight bytes, weights) one decoded token reads from a GGUF: every tensor but the input
    embedding table (one row of it is read), unless it doubles as the output matrix (tied)."""
    from zptr.formats.gguf import OUTPUT, TOKEN_EMBD, open_gguf

    tensors = {t.name: t for t in open_gguf(path).tensors}
    if OUTPUT in tensors:
        tensors.pop(TOKEN_EMBD, None)
    return (sum(int(t.n_bytes) for t in tensors.values()),
            sum(int(t.n_elements) for t in tensors.values()))


def torch_token_cost(model) -> tuple[int, int]:
    """(weight bytes, weights) one decoded token reads from the PyTorch language model: every
    parameter once (shared storage counted once), without the input embedding table unless it is
    also the lm_head. The ZPTR head is left out, as the Omega sidecar is on the GGUF side."""
    lm = model.lm
    embed = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    skip = {embed.data_ptr()} if embed.data_ptr() != head.data_ptr() else set()
    seen = {t.data_ptr(): (t.numel() * t.element_size(), t.numel()) for t in lm.parameters()}
    kept = [cost for ptr, cost in seen.items() if ptr not in skip]
    return sum(b for b, _ in kept), sum(n for _, n in kept)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB. VmHWM belongs to this program alone;
    ru_maxrss would also count the parent's pages at fork time (Linux keeps it across exec)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, standard deviation, spread = sd / median) of repeated measurements."""
    median = statistics.median(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return median, sd, (sd / median if median > 0 else math.inf)


def noisy_timing(timing: dict[str, Sequence[float]]) -> bool:
    """Whether a mode's prefill or decode series spreads beyond :data:`NOISY_SPREAD`: the one
    rule behind a row's flag and a path's re-run."""
    return any(median_spread(timing[kind])[2] > NOISY_SPREAD for kind in ("prefill", "decode"))


def machine_description() -> dict[str, Any]:
    import psutil

    model_name = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    return {"cpu": model_name, "nproc": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version()}


def settle_load(limit_s: float) -> float:
    """Wait (at most ``limit_s``) for the 1-minute load average to fall below the core count, and
    return it. The average trails by a minute: work just finished here (the bench's own GGUF
    conversions, a previous try) would otherwise flag a run on a machine that is now quiet."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= cores and time.monotonic() < deadline:
        time.sleep(2)
    return os.getloadavg()[0]


def machine_busy(machine: dict[str, Any]) -> bool:
    """A load average above the core count at the start: every figure of the run is suspect."""
    return machine["load_average_1m"] > machine["nproc"]
