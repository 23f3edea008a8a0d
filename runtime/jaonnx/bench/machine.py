"""The machine under the numbers: read bandwidth (the decode floor), a speed probe that tells a
slow window (other processes, throttling) from a real regression, and peak RSS."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

MIB = 1 << 20


def read_bandwidth_gbs(buffer_mib: int = 512, threads: int | None = None, passes: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of `passes` sums over a buffer far larger than
    any L3 cache, split across `threads` threads (numpy releases the GIL in reductions), so it
    reads at the rate the decode loop's weight reads can reach."""
    threads = threads or os.cpu_count() or 1
    buf = np.ones(buffer_mib * MIB // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):  # the first pass faults the pages in
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return buf.nbytes / best / 1e9


def _probe() -> float:
    """A fixed ~50 ms mix of compute (matmul) and memory traffic; wall ms."""
    a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
    b = np.ones(16 * MIB // 4, dtype=np.float32)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    for _ in range(8):
        b.sum()
    return (time.perf_counter() - start) * 1000


class Calibrator:
    """Machine-speed calibration before each engine. The first probes set the reference (the
    fastest seen); `check()` says whether the machine is now slower than `tolerance` × that, in
    which case the caller discards what it measured in this window and measures again."""

    def __init__(self, tolerance: float = 1.15, probes: int = 3) -> None:
        self.tolerance = tolerance
        self.probes = probes
        self.best = float("inf")
        self.history: list[float] = []

    def measure(self) -> float:
        value = min(_probe() for _ in range(self.probes))
        self.history.append(value)
        self.best = min(self.best, value)
        return value

    def slowdown(self, value: float | None = None) -> float:
        value = self.measure() if value is None else value
        return value / self.best

    def ok(self, value: float | None = None) -> bool:
        return self.slowdown(value) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "best_ms": self.best, "probes_ms": self.history}


def peak_rss_mib() -> float | None:
    """This process's peak resident set (MiB). Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: a child would report its parent's peak); else getrusage, psutil or None."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MIB if sys.platform == "darwin" else peak / 1024
    except ImportError:
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / MIB
    except ImportError:
        return None
