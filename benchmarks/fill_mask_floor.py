"""Fill-mask against the compute floor, measured in one process so that a busy minute slows the
floor and the rows alike.

`python -m benchmarks.fill_mask_floor --twins DIR NAME=ARTIFACT ... [--torch SRC] [--cpu-time] [--rounds 5]`

Each round, in alternating order: the GEMM peaks (benchmarks/gemm_floor.py: the best of 3 calls
per square size, the best size per kind), then every artifact at seq 32 and 128: the whole
call (`model(texts, top_k=5)`: tokenization, the graph, softmax and top-5, as the suite times
it; median of 5) and the graph alone (`session.run` on the same inputs). A row's ratio to the
floor is taken per round, against that round's peaks; the table shows the median and range.

The floor of a call is its matrix-product FLOPs at the measured peaks: the linear layers at the
int8 peak (`DynamicQuantizeMatMul`: quantizing the activations is part of the work, as in our
per-row graphs) or the fp32 one, attention's two products and the MLM head at the fp32 peak.
The FLOPs are those of a standard BERT forward (every layer at every token, the head at the
mask); artifacts that compute the last layer at the mask rows only do ~7% less at seq 128, and
the JSON gives that count too. `x_bare` is the same ratio against the bare `MatMulInteger`
kernel (no quantize step): the strictest floor.

Two clocks:
- wall time at `--threads` (default 2): what a user sees; on a shared machine the peaks and the
  rows both drop when other work takes a core, so only ratios within a round mean anything.
- `--cpu-time`: 1 thread, CPU time (time.process_time) of each call, for peaks and rows alike:
  the work itself, nearly free of other processes' load. PyTorch (`--torch SRC`, the source
  checkpoint, fp32 eager, 1 thread) runs in the same process then: ORT has no spinning worker
  threads at 1 thread to take its core. With wall time PyTorch is left to the suite.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .gemm_floor import KINDS, bert_fill_mask_flops, fill_mask_floor_ms, square_product

SEQS = (32, 128)


def _clock(cpu_time: bool) -> Callable[[], float]:
    return time.process_time if cpu_time else time.perf_counter


def _peaks(sessions: dict[str, list[tuple[Any, dict[str, Any], int]]], clock: Callable[[], float]) -> dict[str, Any]:
    """GFLOP/s per kind: the best call of 3 per size, the best size."""
    rates = {}
    for kind, per_size in sessions.items():
        best_rate = 0.0
        for session, feed, size in per_size:
            best = float("inf")
            for _ in range(3):
                start = clock()
                session.run(None, feed)
                best = min(best, clock() - start)
            best_rate = max(best_rate, 2.0 * size**3 / max(best, 1e-9) / 1e9)
        rates[kind] = {"median": best_rate}
    return rates


def _ms(fn: Callable[[], Any], clock: Callable[[], float], calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        start = clock()
        fn()
        times.append((clock() - start) * 1000)
    return float(np.median(times))


def _graph_feed(model: Any, text: str) -> dict[str, np.ndarray]:
    """The inputs `model(text)` gives its graph (FillMask.encode: the public view of them)."""
    enc = model.encode(text)
    return {"input_ids": np.array([enc["input_ids"]], np.int64),
            "attention_mask": np.array([enc["attention_mask"]], np.int64),
            "mask_positions": np.array([enc["mask_positions"]], np.int64)}


def _torch_engine(src: str, threads: int) -> Callable[[str], Any]:
    """transformers fp32 eager fill-mask, timed like the suite's PyTorch column (tokenize,
    forward, softmax + top-5 at the masks)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForMaskedLM.from_pretrained(src, dtype=torch.float32).eval()

    def run(text: str) -> Any:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        rows, cols = (enc["input_ids"] == tok.mask_token_id).nonzero(as_tuple=True)
        return logits[rows, cols].softmax(-1).topk(5, dim=-1)

    return run


def ratio_table(rounds: list[dict[str, Any]], seqs: tuple[int, ...] = SEQS) -> dict[str, Any]:
    """Per row: ms, graph ms, × floor (against dynamic_int8 / fp32) and × bare floor (against
    MatMulInteger), each a per-round ratio, median and range; × PyTorch where it ran."""
    table: dict[str, Any] = {}
    for key in rounds[0]["ms"]:
        name, seq = key.rsplit(" seq ", 1)
        entry: dict[str, Any] = {"ms": _range([r["ms"][key] for r in rounds])}
        if name == "pytorch":
            table[key] = entry
            continue
        precision = "int8" if "int8" in name else "fp32"
        floors, bare = [], []
        for r in rounds:
            # the round's peaks: the better of its two probes (a busy minute only lowers them)
            peaks = {k: {"median": max(r["peaks"][k]["median"], r["peaks_after"][k]["median"])} for k in KINDS}
            floors.append(fill_mask_floor_ms(int(seq), peaks, precision))
            bare_peaks = dict(peaks, dynamic_int8=peaks["integer_u8s8"])
            bare.append(fill_mask_floor_ms(int(seq), bare_peaks, precision))
        entry["floor_ms"] = _range(floors)
        entry["x_floor"] = _range([r["ms"][key] / f for r, f in zip(rounds, floors)])
        entry["graph_ms"] = _range([r["graph_ms"][key] for r in rounds])
        entry["graph_x_floor"] = _range([r["graph_ms"][key] / f for r, f in zip(rounds, floors)])
        entry["x_bare"] = _range([r["ms"][key] / f for r, f in zip(rounds, bare)])
        if f"pytorch seq {seq}" in rounds[0]["ms"]:
            entry["x_pytorch"] = _range([r["ms"][f"pytorch seq {seq}"] / r["ms"][key] for r in rounds])
        table[key] = entry
    return table


def main() -> None:
    import onnxruntime as ort

    import jaonnx

    from .__main__ import _texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="NAME=DIR (NAME containing int8 or fp32)")
    parser.add_argument("--twins", required=True)
    parser.add_argument("--recipe", default="jmedroberta")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="1 thread, CPU time of each call (see above)")
    parser.add_argument("--torch", help="source checkpoint: PyTorch rows (with --cpu-time only)")
    parser.add_argument("--sizes", default="1024,2048", help="square GEMM sizes probed for the peaks")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fill_mask_floor.json"))
    args = parser.parse_args()
    if args.torch and not args.cpu_time:
        parser.error("--torch needs --cpu-time (with wall time, ORT's spinning threads slow torch: use the suite)")
    threads = 1 if args.cpu_time else args.threads
    clock = _clock(args.cpu_time)

    by_seq, _, _ = _texts(Path(args.twins) / args.recipe, args.recipe, list(SEQS))
    calls: dict[str, Callable[[str], Any]] = {}
    graphs: dict[str, Callable[[str], Any]] = {}
    for spec in args.artifacts:
        name, path = spec.split("=", 1)
        model = jaonnx.load(path, providers="cpu", intra_op_threads=threads)
        calls[name] = lambda text, m=model: m([text], top_k=5)
        feeds = {text: _graph_feed(model, text) for text in by_seq.values()}
        graphs[name] = lambda text, m=model, f=feeds: m.session.run(["logits"], f[text])
    if args.torch:
        calls["pytorch"] = _torch_engine(args.torch, threads)
    sessions: dict[str, list[tuple[Any, dict[str, Any], int]]] = {k: [] for k in KINDS}
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in KINDS:
            sessions[kind].append((*square_product(kind, size, threads), size))
    for name, fn in calls.items():
        for text in by_seq.values():
            fn(text)
            if name in graphs:
                graphs[name](text)

    rounds: list[dict[str, Any]] = []
    names = list(calls)
    for r in range(args.rounds):
        row: dict[str, Any] = {"peaks": _peaks(sessions, clock), "ms": {}, "graph_ms": {}}
        for name in names if r % 2 == 0 else names[::-1]:
            for seq, text in by_seq.items():
                row["ms"][f"{name} seq {seq}"] = _ms(lambda: calls[name](text), clock)
                if name in graphs:
                    row["graph_ms"][f"{name} seq {seq}"] = _ms(lambda: graphs[name](text), clock)
        row["peaks_after"] = _peaks(sessions, clock)
        rounds.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["ms"].items()), flush=True)

    table = ratio_table(rounds)
    peaks = {k: _range([max(r["peaks"][k]["median"], r["peaks_after"][k]["median"]) for r in rounds]) for k in KINDS}
    result = {"clock": "cpu time, 1 thread" if args.cpu_time else f"wall, {threads} threads", "rounds": args.rounds,
              "threads": threads, "gemm_sizes": args.sizes, "onnxruntime": ort.__version__, "gflops": peaks,
              "flops": {s: bert_fill_mask_flops(s) for s in SEQS},
              "flops_last_layer_at_mask": {s: bert_fill_mask_flops(s, last_layer_at_masks=True) for s in SEQS},
              "rows": table, "raw": rounds, "artifacts": dict(spec.split("=", 1) for spec in args.artifacts)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"gflops": peaks, "rows": table}, indent=1))


def _range(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


if __name__ == "__main__":
    main()
