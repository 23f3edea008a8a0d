"""This machine's GEMM peaks through ONNX Runtime, the compute floor of fill-mask.

Fill-mask at seq 128 is compute-bound: its time cannot go below (its matrix-product work) /
(the best rate ORT's kernels reach on this CPU). The rate is measured here on large square
products of the three kinds our graphs use:
- `MatMul` fp32 (MLAS sgemm, weights prepacked);
- `DynamicQuantizeMatMul` (com.microsoft; fp32 activations quantized per call, int8 per-channel
  weights: what the int8 artifacts run);
- `MatMulInteger` (uint8 x int8 -> int32: the bare integer kernel, no quantize step).

`python -m benchmarks.gemm_floor [--size 2048] [--threads 2] [--rounds 5]` prints JSON; the
candidates are timed in interleaved rounds (order alternating), median and range in GFLOP/s
(2·M·N·K per product).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np


def _model(kind: str, m: int, k: int, n: int) -> tuple[bytes, dict[str, np.ndarray]]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, feed = [], {}
    if kind == "fp32":
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B"))
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        feed["A"] = rng.standard_normal((m, k)).astype(np.float32)
    elif kind == "dynamic_int8":
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B"),
                  numpy_helper.from_array(np.full((n,), 0.01, np.float32), "scale")]
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "scale"], ["Y"], domain="com.microsoft")
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        feed["A"] = rng.standard_normal((m, k)).astype(np.float32)
    elif kind == "integer_u8s8":
        inits.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B"))
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
        feed["A"] = rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        raise ValueError(kind)
    graph = helper.make_graph([node], kind, [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString(), feed


KINDS = ("fp32", "dynamic_int8", "integer_u8s8")


def square_product(kind: str, size: int, threads: int) -> tuple[Any, dict[str, Any]]:
    """A warmed-up CPU session computing one size^3 product of `kind`, and its feed."""
    import onnxruntime as ort

    blob, feed = _model(kind, size, size, size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    return session, feed


def measure(size: int = 2048, threads: int = 2, rounds: int = 5, calls: int = 3) -> dict[str, Any]:
    """GFLOP/s per kind: the best call of each round, median and range over the rounds."""
    import onnxruntime as ort

    sessions = {kind: square_product(kind, size, threads) for kind in KINDS}
    flops = 2.0 * size**3
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            session, feed = sessions[kind]
            best = float("inf")
            for _ in range(calls):
                start = time.perf_counter()
                session.run(None, feed)
                best = min(best, time.perf_counter() - start)
            rates[kind].append(flops / best / 1e9)
    return {"size": size, "threads": threads, "rounds": rounds, "onnxruntime": ort.__version__,
            "gflops": {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
                       for k, v in rates.items()}}


def bert_fill_mask_flops(seq: int, hidden: int = 768, layers: int = 12, inter: int = 3072, vocab: int = 32000,
                         masks: int = 1, last_layer_at_masks: bool = False) -> dict[str, float]:
    """Matrix-product FLOPs of one BERT fill-mask call: the linear layers (quantized in int8
    artifacts), attention's two products (fp32 in every artifact) and the MLM head at the masks.
    `last_layer_at_masks`: the last layer's keys and values at every token, its queries,
    output projection and feed-forward block at the masks only (what our encoder graphs do)."""
    per_token = 4 * hidden * hidden + 2 * hidden * inter
    linear = layers * 2 * seq * per_token
    attention = layers * 2 * 2 * seq * seq * hidden
    if last_layer_at_masks:
        kv = 2 * hidden * hidden
        linear -= 2 * (seq - masks) * (per_token - kv)
        attention -= 2 * 2 * (seq - masks) * seq * hidden
    head = 2 * masks * (hidden * hidden + hidden * vocab)
    return {"linear": float(linear), "attention": float(attention), "head": float(head)}


def fill_mask_floor_ms(seq: int, gflops: dict[str, Any], precision: str) -> float:
    """ms the products of one fill-mask call need at the measured peaks (linear layers at the
    int8 or fp32 peak, attention and the head at the fp32 peak)."""
    f = bert_fill_mask_flops(seq)
    fp32 = gflops["fp32"]["median"] * 1e9
    linear_rate = gflops["dynamic_int8"]["median"] * 1e9 if precision == "int8" else fp32
    return (f["linear"] / linear_rate + (f["attention"] + f["head"]) / fp32) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.size, args.threads, args.rounds)
    result["fill_mask_floor_ms"] = {f"{p} seq {s}": fill_mask_floor_ms(s, result["gflops"], p)
                                    for p in ("fp32", "int8") for s in (32, 128)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
