"""Where a decoder's peak RSS and cold start go: `python -m benchmarks.memory_coldstart ARTIFACT...`.

Each measurement is a fresh process (warm page cache: the artifact is read once before the
rounds) that imports jaonnx, loads the artifact, produces the first token of a greedy generate,
then decodes to context 512. It reports, after each stage, the resident set split into
anonymous memory (ORT's prepacked weights, the KV cache, arenas) and file pages (mapped weights,
shared libraries), the peak (VmHWM), the wall time since process start and the process's CPU
time. Two kinds of start per artifact, interleaved over the rounds:
- `first`: an empty JAONNX_CACHE_DIR, as on the first load ever;
- `cached`: the same cache folder again (for an artifact that uses the optimized-graph cache,
  its entry exists by then).
Wall times on a shared machine are noisy: compare the CPU times, and walls only within a round.
Writes benchmarks/results/memory_coldstart.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
STAGES = ("imports", "load", "first_token", "decode_512")
TEXT = "今日は良い天気です。明日の天気は"


def _child(path: str, epoch: float) -> dict[str, Any]:
    """The measured process: stage marks as {stage: {wall_s, cpu_s, rss..., hwm}}."""
    marks: dict[str, Any] = {}

    def mark(stage: str) -> None:
        status = {}
        for line in open("/proc/self/status", encoding="ascii"):
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0]) / 1024
        times = os.times()
        marks[stage] = {"wall_s": time.time() - epoch, "cpu_s": times.user + times.system,
                        "peak_mib": status["VmHWM"], "rss_mib": status["VmRSS"],
                        "anon_mib": status["RssAnon"], "file_mib": status["RssFile"] + status.get("RssShmem", 0)}

    import numpy  # noqa: F401  (the imports stage: what any jaonnx process pays before loading)

    import jaonnx
    from jaonnx import session  # noqa: F401
    from jaonnx.generation import generator  # noqa: F401

    mark("imports")
    gen = jaonnx.load(path, providers="cpu")
    mark("load")
    gen.generate(TEXT, max_new_tokens=1, do_sample=False)
    mark("first_token")
    gen.generate(TEXT, max_new_tokens=500, min_new_tokens=500, do_sample=False)
    mark("decode_512")
    return marks


def _run(path: Path, cache_dir: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, JAONNX_CACHE_DIR=cache_dir, JAONNX_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT.parent), str(ROOT.parent / "runtime"),
                                           os.environ.get("PYTHONPATH", "")]))
    epoch = time.time()
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_coldstart", "--child", str(path), str(epoch)],
                         capture_output=True, text=True, env=env, cwd=ROOT.parent, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{path}: exited {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


def _warm(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def _median(runs: list[dict[str, Any]], stage: str, field: str) -> float:
    return statistics.median(r[stage][field] for r in runs)


def _table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    lines = ["| artifact | start | imports s (cpu) | load s (cpu) | first token s (cpu) | RSS after imports | "
             "after load: anon + file | after first token | after decode to 512 | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, kinds in results.items():
        for kind, runs in kinds.items():
            cells = [f"{_median(runs, s, 'wall_s'):.2f} ({_median(runs, s, 'cpu_s'):.2f})"
                     for s in ("imports", "load", "first_token")]
            load = f"{_median(runs, 'load', 'anon_mib'):.0f} + {_median(runs, 'load', 'file_mib'):.0f}"
            lines.append(f"| {name} | {kind} | {' | '.join(cells)} | {_median(runs, 'imports', 'rss_mib'):.0f} | "
                         f"{load} | {_median(runs, 'first_token', 'rss_mib'):.0f} | "
                         f"{_median(runs, 'decode_512', 'rss_mib'):.0f} | **{_median(runs, 'decode_512', 'peak_mib'):.0f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory_coldstart")
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {p.name: {"first": [], "cached": []} for p in args.artifacts}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.artifacts:
            _warm(path)
        for r in range(args.rounds):
            for path in args.artifacts if r % 2 == 0 else args.artifacts[::-1]:
                cache = Path(tmp) / f"{path.name}-{r}"
                results[path.name]["first"].append(_run(path, str(cache), args.threads))
                results[path.name]["cached"].append(_run(path, str(cache), args.threads))
                print(f"round {r + 1}: {path.name}", file=sys.stderr)
    table = _table(results)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                                         "artifacts": [str(p) for p in args.artifacts],
                                                         "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(
        f"# Peak RSS and cold start ({args.rounds} rounds, {args.threads} threads; medians; wall since process "
        f"start, process CPU time in brackets; MiB)\n\n{table}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], float(sys.argv[3]))))
    else:
        main()
