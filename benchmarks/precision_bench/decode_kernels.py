"""Decode and prefill speed of static-KV decoder artifacts (and ORT session settings), side by
side: every configuration's session stays loaded and the rounds interleave them, so machine
noise hits all alike. Reports per configuration the median [min-max] over rounds of:
decode ms/token at M=1 (ctx 64 and 512) and M=8 (ctx 64, ms per step), prefill of 128 tokens,
and the floor ratio (weight bytes read per token / the measured read bandwidth).

    python decode_kernels.py ROUNDS OUT.json NAME=ARTIFACT_DIR[@key=value,...] ...

`@key=value` adds ORT session config entries (e.g. @session.disable_prepacking=1). Needs only
numpy + onnxruntime; binds present.N.* to the past buffers as generation/static_cache.py does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

THREADS = int(os.environ.get("THREADS", "2"))
# On a shared machine wall time measures the neighbours: at 1 thread, CPU time of this process
# (time.process_time) is the default clock.
CLOCK = os.environ.get("CLOCK", "cpu" if THREADS == 1 else "wall")
_now = time.process_time if CLOCK == "cpu" else time.perf_counter
CAPACITY = 640
STEPS = int(os.environ.get("STEPS", "40"))


def weight_bytes(model_path: Path) -> int:
    """Bytes a decode step reads: every initializer except tables read only by Gather."""
    model = onnx.load(str(model_path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered:
            continue
        size = int(np.prod(t.dims)) if t.dims else 1
        total += size * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def read_bandwidth() -> float:
    """GB/s of summing a 512 MB array (best of 3): the floor's denominator."""
    a = np.ones(128 << 20, np.float32)
    best = min(_timed(a.sum) for _ in range(3))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Step:
    """One configuration: a session plus bound buffers for (rows, seq, ctx)."""

    def __init__(self, path: Path, config: dict[str, str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.pasts = [i for i in self.session.get_inputs() if i.name.startswith("past")]
        self.bindings: dict[tuple[int, int, int], tuple] = {}

    def binding(self, rows: int, seq: int, ctx: int):
        key = (rows, seq, ctx)
        if key not in self.bindings:
            b = self.session.io_binding()
            feeds = {"input_ids": np.full((rows, seq), 5, np.int64),
                     "position_ids": np.tile(np.arange(ctx, ctx + seq, dtype=np.int64), (rows, 1)),
                     "seqlens_k": np.full((rows,), ctx + seq - 1, np.int32),
                     "total_sequence_length": np.array(ctx + seq, np.int32),
                     "logits_to_keep": np.array([1], np.int64)}
            keep = list(feeds.values())
            for name, value in feeds.items():
                b.bind_cpu_input(name, value)
            rng = np.random.default_rng(0)
            for i in self.pasts:
                v = rng.standard_normal((rows, i.shape[1], CAPACITY, i.shape[3])).astype(np.float32)
                keep.append(v)
                b.bind_input(i.name, "cpu", 0, np.float32, list(v.shape), v.ctypes.data)
                b.bind_output(i.name.replace("past_key_values", "present"), "cpu", 0, np.float32, list(v.shape),
                              v.ctypes.data)
            b.bind_output("logits", "cpu")
            self.bindings[key] = (b, keep)
        return self.bindings[key][0]

    def ms(self, rows: int, seq: int, ctx: int, runs: int) -> float:
        b = self.binding(rows, seq, ctx)
        self.session.run_with_iobinding(b)  # warm
        t = _now()
        for _ in range(runs):
            self.session.run_with_iobinding(b)
        return (_now() - t) / runs * 1e3


WORKLOADS = {  # name: (rows, seq, ctx, runs)
    "decode_ctx64": (1, 1, 64, STEPS),
    "decode_ctx512": (1, 1, 512, STEPS),
    "decode_b8_ctx64": (8, 1, 64, STEPS // 4),
    "prefill_128": (1, 128, 0, 3),
}


def main() -> None:
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    configs = {}
    for spec in sys.argv[3:]:
        name, rest = spec.split("=", 1)
        path, _, extra = rest.partition("@")
        configs[name] = (Path(path), dict(kv.split("=", 1) for kv in extra.split(",") if kv))
    steps = {name: Step(path, config) for name, (path, config) in configs.items()}
    sizes = {name: weight_bytes(path / "model.onnx") for name, (path, _) in configs.items()}
    # numpy's sum is one thread: it underestimates what 2 threads read; BANDWIDTH_GBS (e.g. the
    # suite's measured 41.1) gives the floor the suite uses.
    fixed = float(os.environ.get("BANDWIDTH_GBS", "0"))
    bandwidth = fixed or read_bandwidth()
    times: dict[str, dict[str, list[float]]] = {n: {w: [] for w in WORKLOADS} for n in configs}
    for _ in range(rounds):
        for work, (rows, seq, ctx, runs) in WORKLOADS.items():
            for name, step in steps.items():
                times[name][work].append(step.ms(rows, seq, ctx, runs))
    bandwidth = fixed or max(bandwidth, read_bandwidth())
    result = {"threads": THREADS, "clock": CLOCK, "rounds": rounds, "read_bandwidth_gbs": round(bandwidth, 1),
              "load_average": os.getloadavg()[0], "configs": {}}
    print(f"read bandwidth {bandwidth:.1f} GB/s, {THREADS} threads, {CLOCK} time, {rounds} interleaved rounds, "
          f"median [min-max] ms, load average {os.getloadavg()[0]:.1f}")
    print(f"| config | MB read/token | floor ms | {' | '.join(WORKLOADS)} | decode_ctx64 / floor |")
    print("|---|---|---|" + "---|" * len(WORKLOADS) + "---|")
    for name in configs:
        floor = sizes[name] / bandwidth / 1e6
        cells = {w: (float(np.median(v)), min(v), max(v)) for w, v in times[name].items()}
        result["configs"][name] = {"artifact": str(configs[name][0]), "session_config": configs[name][1],
                                   "weight_mb": round(sizes[name] / 1e6, 1), "floor_ms": round(floor, 3),
                                   "ms": {w: [round(x, 3) for x in c] for w, c in cells.items()}}
        row = " | ".join(f"{m:.2f} [{lo:.2f}-{hi:.2f}]" for m, lo, hi in cells.values())
        print(f"| {name} | {sizes[name] / 1e6:.1f} | {floor:.2f} | {row} | {cells['decode_ctx64'][0] / floor:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
