"""Where a decode step (M=1, ctx 64) and a 128-token prefill spend their time, per ONNX op
type, from ORT's own profiler (kernel time, so per-op overheads outside kernels are not in it),
for static-KV decoder artifacts: the evidence behind README "CPU precision" on int4 prefill.

    python op_profile.py OUT.json NAME=ARTIFACT_DIR ...

1 intra-op thread by default (THREADS=2 for two): kernel times of a profiled run are
inflated by the profiler but comparable between artifacts and between M=1 and M=128.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from decode_kernels import Step  # noqa: E402  (the same bound buffers as the timing benchmark)

THREADS = int(os.environ.get("THREADS", "1"))
WORK = {"decode M=1 ctx64": (1, 1, 64, 20), "prefill M=128": (1, 128, 0, 3)}


def profile(path: Path, rows: int, seq: int, ctx: int, runs: int) -> dict[str, dict[str, float]]:
    step = Step(path, {})
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/jaonnx_op_profile_{os.getpid()}"
    step.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    binding = step.binding(rows, seq, ctx)
    step.session.run_with_iobinding(binding)
    for _ in range(runs):
        step.session.run_with_iobinding(binding)
    trace = Path(step.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = runs + 1
    return {op: {"ms": round(us / n / 1e3, 3), "nodes": count[op] // n} for op, us in total.most_common()}


def main() -> None:
    out = Path(sys.argv[1])
    result: dict = {"threads": THREADS, "ort": ort.__version__, "load_average": os.getloadavg()[0], "artifacts": {}}
    for spec in sys.argv[2:]:
        name, path = spec.split("=", 1)
        result["artifacts"][name] = {w: profile(Path(path), *args) for w, args in WORK.items()}
    for name, works in result["artifacts"].items():
        for work, ops in works.items():
            total = sum(o["ms"] for o in ops.values())
            top = ", ".join(f"{op} {o['ms']:.2f} ({o['nodes']})" for op, o in list(ops.items())[:6])
            print(f"| {name} | {work} | {total:.2f} | {top} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
