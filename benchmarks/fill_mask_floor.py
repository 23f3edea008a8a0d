"""Fill-mask against the compute floor, measured in one process so that a busy minute slows the
floor and the rows alike.

`python -m benchmarks.fill_mask_floor --twins DIR NAME=ARTIFACT ... [--rounds 5]`

Each round, in alternating order: the GEMM peaks (benchmarks/gemm_floor.py: best of 3 large
square products per kind), then every artifact at seq 32 and 128 (median of 5 calls,
tokenization and top-5 included, as the suite times it). A row's ratio to the floor is taken
per round (its ms over the floor computed from that round's peaks); the table shows the median
and range of those ratios. PyTorch is left to the suite: in one process with ORT, ORT's spinning
worker threads take the cores from torch's (5x slower torch rows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .gemm_floor import KINDS, _model, bert_fill_mask_flops, fill_mask_floor_ms


def _peaks(sessions: dict[str, Any], size: int) -> dict[str, Any]:
    rates = {}
    for kind, (session, feed) in sessions.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            session.run(None, feed)
            best = min(best, time.perf_counter() - start)
        rates[kind] = {"median": 2.0 * size**3 / best / 1e9}
    return rates


def _ms(fn: Any, texts: list[str], calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(texts)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main() -> None:
    import onnxruntime as ort

    import jaonnx

    from .__main__ import _texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="NAME=DIR (NAME ending in int8 or fp32)")
    parser.add_argument("--twins", required=True)
    parser.add_argument("--recipe", default="jmedroberta")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fill_mask_floor.json"))
    args = parser.parse_args()

    by_seq, _, _ = _texts(Path(args.twins) / args.recipe, args.recipe, [32, 128])
    engines: dict[str, Any] = {}
    for spec in args.artifacts:
        name, path = spec.split("=", 1)
        model = jaonnx.load(path, providers="cpu", intra_op_threads=args.threads)
        engines[name] = lambda texts, m=model: m(texts, top_k=5)
    sessions = {}
    for kind in KINDS:
        blob, feed = _model(kind, args.size, args.size, args.size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions[kind] = (ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]), feed)
    for fn in engines.values():
        for text in by_seq.values():
            fn([text])

    rounds: list[dict[str, Any]] = []
    names = list(engines)
    for r in range(args.rounds):
        row: dict[str, Any] = {"peaks": _peaks(sessions, args.size), "ms": {}}
        for name in names if r % 2 == 0 else names[::-1]:
            for seq, text in by_seq.items():
                row["ms"][f"{name} seq {seq}"] = _ms(engines[name], [text])
        row["peaks_after"] = _peaks(sessions, args.size)
        rounds.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["ms"].items()), flush=True)

    table: dict[str, Any] = {}
    for key in rounds[0]["ms"]:
        name, seq = key.rsplit(" seq ", 1)
        ratios = []
        for row in rounds:
            # the round's peaks: the better of its two probes (a busy minute only lowers them)
            peaks = {k: {"median": max(row["peaks"][k]["median"], row["peaks_after"][k]["median"])} for k in KINDS}
            precision = "int8" if "int8" in name else "fp32"
            ratios.append(row["ms"][key] / fill_mask_floor_ms(int(seq), peaks, precision))
        ms = [row["ms"][key] for row in rounds]
        table[key] = {"ms": _range(ms), "x_floor": _range(ratios)}
    peaks = {k: _range([max(r["peaks"][k]["median"], r["peaks_after"][k]["median"]) for r in rounds]) for k in KINDS}
    result = {"rounds": args.rounds, "threads": args.threads, "gemm_size": args.size, "gflops": peaks,
              "flops": {s: bert_fill_mask_flops(s) for s in (32, 128)}, "rows": table, "raw": rounds,
              "artifacts": dict(spec.split("=", 1) for spec in args.artifacts)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"gflops": peaks, "rows": table}, indent=1))


def _range(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


if __name__ == "__main__":
    main()
