"""Per-token work outside the graph, in CPU time at 1 thread, so it can be read on a busy machine:
(generate CPU per token) - (bare ORT loop CPU per step) on the same artifact, interleaved rounds.

`python -m benchmarks.outside_graph ART [CONTEXT] [ROUNDS]`. The wall-time version of this row is in
the suite's table and in `jaonnx bench`; this one trades wall time for robustness to other load."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jaonnx
from jaonnx.bench.artifact import prefix_with_tokens
from jaonnx.bench.bare import BareDecoder


def _cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def measure(path: str, context: int = 64, rounds: int = 7, n: int = 32) -> dict[str, float]:
    gen = jaonnx.load(path, providers="cpu", intra_op_threads=1)
    bare = BareDecoder(path, threads=1)
    prompt = prefix_with_tokens(lambda t: len(gen.encode(t)), context)

    def run(k: int) -> Any:
        return gen.generate([prompt], max_new_tokens=k, min_new_tokens=k, do_sample=False)

    run(2), bare.step_times(context, 2)
    over, gens, bares = [], [], []
    for _ in range(rounds):
        g = (_cpu_ms(lambda: run(n + 1)) - _cpu_ms(lambda: run(1))) / n
        b = (_cpu_ms(lambda: bare.step_times(context, n)) - _cpu_ms(lambda: bare.step_times(context, 0))) / n
        gens.append(g), bares.append(b), over.append(g - b)
    return {"generate_cpu_ms": statistics.median(gens), "bare_cpu_ms": statistics.median(bares),
            "outside_ms": statistics.median(over), "outside_min": min(over), "outside_max": max(over)}


if __name__ == "__main__":
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    r = measure(sys.argv[1], ctx, int(sys.argv[3]) if len(sys.argv) > 3 else 7)
    print(f"{sys.argv[1]} context {ctx}: generate {r['generate_cpu_ms']:.2f} ms CPU/token, bare loop "
          f"{r['bare_cpu_ms']:.2f}, outside the graph {r['outside_ms']:+.3f} ms "
          f"(range {r['outside_min']:+.3f}..{r['outside_max']:+.3f})")
