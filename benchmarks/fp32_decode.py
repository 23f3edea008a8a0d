"""fp32 decode, jaonnx against CTranslate2, as CPU time at 1 thread (the shared machine makes
wall time meaningless; CPU time at one thread is what the work itself costs, stalls included).

`python -m benchmarks.fp32_decode --src CHECKPOINT --artifact DIR [--rounds 4]`: each round, in
alternating order, one fresh process per engine measures CPU ms per decode token at context 64
((CPU(n+1 tokens) - CPU(1 token)) / n, as the suite's wall-time rows) and, for jaonnx, the same
graph in a bare ORT loop plus ORT's per-operator profile of that loop.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import peers
from .common import ROOT


def _cpu_ms(fn: Any) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def child(kind: str, path: str, cache: str, prompt: tuple[list[int], str], n: int, repeat: int) -> dict[str, Any]:
    ids, text = prompt
    if kind == "ctranslate2":
        from .worker import _CT2

        d = _CT2(path, 1, {"peer_cache": cache})
        gen = lambda k: d.generate([ids], [""], k)  # noqa: E731
    else:
        import jaonnx

        g = jaonnx.load(path, providers="cpu", intra_op_threads=1)
        gen = lambda k: g.generate(text, max_new_tokens=k, min_new_tokens=k, do_sample=False)  # noqa: E731
    gen(2)
    per = []
    for _ in range(repeat):
        one, many = _cpu_ms(lambda: gen(1)), _cpu_ms(lambda: gen(n + 1))
        per.append((many - one) / n)
    out: dict[str, Any] = {"cpu_ms_per_token": float(np.median(per)), "all": per}
    if kind == "jaonnx":
        out |= _bare(path, len(ids), n, repeat)
    return out


def _bare(path: str, ctx: int, n: int, repeat: int) -> dict[str, Any]:
    """The same graph in a bare loop (CPU ms per step) and ORT's per-operator profile of it."""
    import tempfile

    import jaonnx
    from jaonnx.bench import summarize_profile

    g = jaonnx.load(path, providers="cpu", intra_op_threads=1)
    ids = np.arange(10, 10 + ctx, dtype=np.int64)[None]

    def steps(gen: Any, k: int) -> float:
        running = gen.new_batch()
        logits = running.add(ids.tolist(), reserve=ctx + k + 2)
        start = time.process_time()
        for _ in range(k):
            logits = running.step(logits.argmax(-1).astype(np.int64)[:, None])[:, -1]
        return (time.process_time() - start) * 1000 / k

    steps(g, 2)
    bare = float(np.median([steps(g, n) for _ in range(repeat)]))
    with tempfile.TemporaryDirectory() as tmp:
        prof = jaonnx.load(path, providers="cpu", intra_op_threads=1, profile=True)
        steps(prof, n)
        trace = prof.session.end_profiling()
        ops = summarize_profile(trace, top=12)
        Path(trace).unlink(missing_ok=True)
    return {"bare_cpu_ms_per_step": bare, "profile": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--cache", default="~/.cache/jaonnx-benchmarks/real/peers/ct2-fp32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "results" / "fp32_decode.json"))
    parser.add_argument("--twins", required=True, help="a twins directory (the tokenizer)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path = args.src if args.child == "ctranslate2" else args.artifact
        prompt = json.loads(args.prompt)
        print(json.dumps(child(args.child, path, str(Path(args.cache).expanduser()), prompt, args.steps, 3)))
        return
    from .configs import REAL
    from .llamacpp import prompts

    prompt = prompts(REAL["gpt2-small"], Path(args.twins), [args.ctx])[str(args.ctx)]
    python, why = peers.ensure("ctranslate2")
    engines = {"jaonnx": sys.executable} | ({"ctranslate2": python} if python else {})
    env = {"OMP_NUM_THREADS": "1", "JAONNX_THREADS": "1", "PYTHONPATH": f"{ROOT.parent}:{ROOT.parent / 'runtime'}"}
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            proc = subprocess.run([engines[engine], "-m", "benchmarks.fp32_decode", "--child", engine, "--src", args.src,
                                   "--artifact", args.artifact, "--cache", args.cache, "--twins", args.twins,
                                   "--prompt", json.dumps(prompt),
                                   "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT.parent,
                                  env={**__import__("os").environ, **env})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            runs[engine].append(json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]})
            print(f"round {r + 1} {engine}: {runs[engine][-1].get('cpu_ms_per_token', runs[engine][-1].get('error'))}",
                  flush=True)
    summary = {e: {"cpu_ms_per_token": _range([x["cpu_ms_per_token"] for x in v if "error" not in x])}
               for e, v in runs.items()}
    ok = [x for x in runs["jaonnx"] if "error" not in x]
    if ok:
        summary["jaonnx"]["bare_cpu_ms_per_step"] = _range([x["bare_cpu_ms_per_step"] for x in ok])
        summary["jaonnx"]["profile"] = ok[-1]["profile"]
    result = {"ctx": args.ctx, "steps": args.steps, "rounds": args.rounds, "threads": 1, "summary": summary,
              "unavailable": {"ctranslate2": why} if not python else {}, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=1))


def _range(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


if __name__ == "__main__":
    main()
