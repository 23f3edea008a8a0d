"""Machine facts and the one-subprocess-per-measurement runner (timing lives in jaonnx.bench)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f" {f}" in flags]
    except (OSError, StopIteration):
        isa = []
    versions = {}
    for name in ("onnxruntime", "onnx", "torch", "transformers", "numpy", "jaonnx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    mem = 0
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "isa": isa, "logical_cores": os.cpu_count(), "memory_mib": mem,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_worker(kind: str, args: dict[str, Any], threads: int, python: str | None = None,
               timeout: float = 900) -> dict[str, Any]:
    """Run `benchmarks.worker` in a fresh process; returns its JSON plus wall time and peak RSS."""
    env = dict(os.environ, JAONNX_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT.parent), str(ROOT.parent / "runtime"),
                                            os.environ.get("PYTHONPATH", "")]))
    start, epoch = time.perf_counter(), time.time()
    proc = subprocess.Popen([python or sys.executable, "-m", "benchmarks.worker", kind, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT.parent, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    # communicate() reaped the child; its rusage is folded into RUSAGE_CHILDREN only, so the
    # worker reports its own peak RSS (ru_maxrss) in its JSON instead.
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])[:400]
        return {"error": f"{kind} exited {proc.returncode}: {tail}", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    if "result_at" in result:
        result["cold_start_s"] = result.pop("result_at") - epoch
    return result
