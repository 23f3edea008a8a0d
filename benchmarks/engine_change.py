"""What the generation engine changed, measured side by side (issue 9).

1. Continuous-batching tokens/s at 1, 8 and 32 clients over HTTP, before (a checkout of the
   commit before the engine) and after, both servers up at once and measured interleaved.
2. The cost of one join and one leave at 32 active rows: the old numpy round trip of the whole
   cache (what `serving/batcher.py` did before) against the engine's `KVOps` in ONNX Runtime.
3. The RSS of a join/leave soak (default 5 minutes) on the engine.

    git worktree add /tmp/before <commit-before-the-engine>
    python -m benchmarks.engine_change --before /tmp/before [--soak-s 300] [ART_DIR]

Writes benchmarks/results/engine.md and engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["近年の機械学習は", "東京は日本の", "今日は天気が良いので", "大学で", "日本の首都は", "4年に1度"]


def http_levels(before: Path, artifact: Path, levels: list[int], repeats: int, new_tokens: int) -> list[dict[str, Any]]:
    from benchmarks.serving_load import server_process, throughput

    model = artifact.name
    rows = []
    with ExitStack() as stack:
        urls = {}
        for label, tree in (("before", before), ("after", Path(__file__).resolve().parents[1])):
            os.environ["PYTHONPATH"] = f"{tree / 'runtime'}"
            urls[label] = stack.enter_context(server_process([artifact], max_batch_size=32))
        os.environ.pop("PYTHONPATH", None)
        for clients in levels:
            got: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(repeats):
                for label in ("before", "after"):
                    report = throughput(urls[label], model, clients, 2, new_tokens)
                    got[label].append(report.tokens_per_s)
            rows.append({"clients": clients, **{f"{k}_tokens_per_s": statistics.median(v) for k, v in got.items()},
                         **{f"{k}_runs": v for k, v in got.items()}})
            print(rows[-1], flush=True)
    return rows


def join_cost(artifact: Path, rows: int, context: int, repeats: int) -> dict[str, Any]:
    """Merge one new row into a `rows`-row cache, and drop one row, both ways."""
    import onnxruntime as ort

    import jaonnx
    from jaonnx.bench.timing import time_calls

    gen = jaonnx.load(artifact, providers="cpu")
    batch = gen.new_batch()
    prompt = gen.encode(PROMPTS[0])
    batch.add([prompt] * rows, reserve=context)
    while batch.width < context:
        batch.step(np.full((batch.rows, 1), 5, dtype=np.int64))
    joiner = gen.new_batch()
    joiner.add([prompt], reserve=context)
    main, new = batch.past, joiner.past
    device = gen.decoder.device

    def numpy_merge() -> list[Any]:  # serving/batcher.py before the engine (commit dc2dab0)
        width = max(main[0].shape()[2], new[0].shape()[2])
        pad = lambda a: np.pad(a, [(0, 0), (0, 0), (width - a.shape[2], 0), (0, 0)])  # noqa: E731
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.concatenate([pad(a.numpy()), pad(b.numpy())])),
                                                 device, 0) for a, b in zip(main, new)]

    keep = np.arange(rows - 1)

    def numpy_leave() -> list[Any]:
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[keep][:, :, 0:]), device, 0)
                for v in main]

    cases = {
        "join_numpy_ms": lambda: numpy_merge(),
        "join_kv_ops_ms": lambda: gen.kv_ops.merge(main, new),
        "leave_numpy_ms": lambda: numpy_leave(),
        "leave_kv_ops_ms": lambda: gen.kv_ops.select(main, keep, 0, batch.width),
    }
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):  # interleaved rounds
        for name, fn in cases.items():
            runs[name] += time_calls(fn, repeats, warmup=0)
    cache_mb = sum(v.shape()[0] * v.shape()[1] * v.shape()[2] * v.shape()[3] for v in main) * 4 / 1e6
    return {"rows": rows, "context": context, "cache_mb": round(cache_mb, 1),
            **{k: round(statistics.median(v), 3) for k, v in runs.items()},
            **{k.replace("_ms", "_p90_ms"): round(float(np.percentile(v, 90)), 3) for k, v in runs.items()}}


def soak(artifact: Path, seconds: float, max_batch: int) -> dict[str, Any]:
    import psutil

    import jaonnx

    gen = jaonnx.load(artifact, providers="cpu")
    engine = gen.engine(max_batch_size=max_batch)
    process = psutil.Process()
    samples = []
    start = last = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        if engine.num_waiting_requests < 2:
            engine.add_request(PROMPTS[i % len(PROMPTS)], do_sample=True, seed=i, max_new_tokens=1 + i % 24,
                               num_return_sequences=1)
            if i % 5 == 0:
                engine.abort_request(f"req-{i - 3}") if i > 3 else None
            i += 1
        engine.step()
        if time.monotonic() - last >= 5 or not samples:
            samples.append((round(time.monotonic() - start, 1), process.memory_info().rss / 2**20))
            last = time.monotonic()
    rss = [r for _, r in samples]
    return {"seconds": seconds, "requests": i, "tokens": engine.tokens_generated, "rss_first_mib": round(rss[0], 1),
            "rss_max_mib": round(max(rss), 1), "rss_last_mib": round(rss[-1], 1),
            "rss_after_first_minute_max_growth_mib": round(max(rss) - rss[min(len(rss) - 1, 12)], 1),
            "samples": samples}


def markdown(meta: dict[str, Any], levels: list[dict[str, Any]], join: dict[str, Any], soaked: dict[str, Any]) -> str:
    lines = ["# The generation engine, before and after (`benchmarks/engine_change.py`)", "",
             f"{meta['machine']}; model `{meta['model']}`; {meta['note']}", "",
             "## Continuous batching over HTTP, tokens/s (median of interleaved repeats)", "",
             "| clients | before | after | after / before | runs before | runs after |", "|---:|---:|---:|---:|---|---|"]
    for r in levels:
        lines.append(f"| {r['clients']} | {r['before_tokens_per_s']:.0f} | {r['after_tokens_per_s']:.0f} | "
                     f"{r['after_tokens_per_s'] / r['before_tokens_per_s']:.2f}x | "
                     f"{', '.join(f'{x:.0f}' for x in r['before_runs'])} | {', '.join(f'{x:.0f}' for x in r['after_runs'])} |")
    lines += ["", f"## One join / one leave at {join['rows']} active rows, context {join['context']} "
                  f"({join['cache_mb']} MB of cache), median ms (p90)", "",
              "| operation | numpy round trip (before) | KVOps in ONNX Runtime (after) | ratio |", "|---|---:|---:|---:|"]
    for op in ("join", "leave"):
        a, b = join[f"{op}_numpy_ms"], join[f"{op}_kv_ops_ms"]
        lines.append(f"| {op} | {a:.2f} ({join[f'{op}_numpy_p90_ms']:.2f}) | {b:.2f} ({join[f'{op}_kv_ops_p90_ms']:.2f}) "
                     f"| {a / b:.2f}x |")
    lines += ["", f"## Join/leave soak ({soaked.get('artifact', meta['model'])}): {soaked['seconds']:.0f} s, "
                  f"{soaked['requests']} requests, "
                  f"{soaked['tokens']} tokens", "",
              f"RSS first {soaked['rss_first_mib']} MiB, max {soaked['rss_max_mib']} MiB, last "
              f"{soaked['rss_last_mib']} MiB; growth after the first minute: "
              f"{soaked['rss_after_first_minute_max_growth_mib']} MiB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the commit before the engine")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--soak-s", type=float, default=300)
    parser.add_argument("--soak-artifact", type=Path, help="artifact for the soak (default: ARTIFACT)")
    parser.add_argument("--note", default="")
    parser.add_argument("--parts", default="join,http,soak", help="which parts to run; the others are read "
                        "from an earlier engine.json (the soak measures RSS, not speed: it may share the machine)")
    args = parser.parse_args()
    artifact = args.artifact or Path(os.environ.get("JAONNX_TEST_CACHE", "")) / "artifacts" / "rinna-gpt-1b"
    parts = set(args.parts.split(","))
    old = json.loads((RESULTS / "engine.json").read_text()) if (RESULTS / "engine.json").is_file() else {}
    join = join_cost(artifact, rows=32, context=64, repeats=20) if "join" in parts else old["join"]
    print(join, flush=True)
    levels = (http_levels(args.before, artifact, [int(x) for x in args.levels.split(",")], args.repeats,
                          args.new_tokens) if "http" in parts else old["levels"])
    soaked = soak(args.soak_artifact or artifact, args.soak_s, max_batch=16) if "soak" in parts else old["soak"]
    if "soak" in parts:
        soaked["artifact"] = (args.soak_artifact or artifact).name
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "model": artifact.name, "note": args.note}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps({"meta": meta, "levels": levels, "join": join, "soak": soaked},
                                                    indent=2) + "\n")
    (RESULTS / "engine.md").write_text(markdown(meta, levels, join, soaked))
    print(markdown(meta, levels, join, soaked))


if __name__ == "__main__":
    main()
