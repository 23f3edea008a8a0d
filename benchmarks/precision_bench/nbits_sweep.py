"""One weight product of a real shape in every MatMulNBits configuration ORT 1.32 offers on
CPU, against the int8 per-row product (MatMulIntegerToFloat) the int8 artifacts use:
CPU time at M=1 (decode) and M=128 (prefill), and whether rows computed alone equal the same
rows computed in a batch (batch invariance). The graphs are built by the exporter's own
Linear classes (linear_ops.py), so the sweep measures exactly what an export would write.

    python nbits_sweep.py K N ROUNDS OUT.json     # e.g. 768 3072 (GPT-2 small MLP up-projection)

1 intra-op thread, time.process_time (CPU time of this process): on a shared machine wall
time measures the neighbours. Rounds interleave the configurations.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from jaonnx_export.linear_ops import Int8PerRow, Linear, NBitBlocks


def graph(linear: Linear, weight: np.ndarray, bias: np.ndarray) -> bytes:
    from onnx import numpy_helper

    k, n = weight.shape
    nodes, inits = linear("x", weight, "bias", "y", "w")
    inits.append(numpy_helper.from_array(bias, "bias"))
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def configs() -> dict[str, tuple[Linear, dict[str, str]]]:
    out: dict[str, tuple[Linear, dict[str, str]]] = {"int8 rows (MatMulIntegerToFloat)": (Int8PerRow(True), {})}
    for bits in (4, 8):
        for block in (16, 32, 64, 128):
            for level in (0, 4):
                for symmetric in (False, True):
                    if bits == 8 and (symmetric or block in (16, 64)):
                        continue
                    name = f"int{bits} b{block} acc{level}{' sym' if symmetric else ''}"
                    out[name] = (NBitBlocks(block, level, symmetric, bits), {})
    out["int4 b32 acc1"] = (NBitBlocks(32, 1), {})
    out["int4 b32 acc4, prepacking off"] = (NBitBlocks(32, 4), {"session.disable_prepacking": "1"})
    out["int8 rows, prepacking off"] = (Int8PerRow(True), {"session.disable_prepacking": "1"})
    return out


def main() -> None:
    k, n, rounds, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.02).astype(np.float32)
    x = rng.standard_normal((128, k)).astype(np.float32)
    exact = x @ weight + bias
    sessions, rows = {}, {}
    for name, (linear, config) in configs().items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        s = ort.InferenceSession(graph(linear, weight, bias), options, providers=["CPUExecutionProvider"])
        alone = np.concatenate([s.run(None, {"x": x[i : i + 1]})[0] for i in range(8)])
        together = s.run(None, {"x": x})[0]
        rows[name] = {"batch_invariant_measured": bool(np.array_equal(alone, together[:8])),
                      "batch_invariant_declared": bool(linear.batch_invariant),
                      "rel_error": float(np.abs(together - exact).max() / np.abs(exact).max())}
        sessions[name] = s
    times: dict[str, dict[str, list[float]]] = {name: {"m1": [], "m128": []} for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for key, m, runs in (("m1", 1, 100), ("m128", 128, 4)):
                feed = {"x": x[:m]}
                s.run(None, feed)
                t = time.process_time()
                for _ in range(runs):
                    s.run(None, feed)
                times[name][key].append((time.process_time() - t) / runs * 1e3)
    base = float(np.median(times["int8 rows (MatMulIntegerToFloat)"]["m128"]))
    print(f"K={k} N={n}, 1 thread, CPU time, {rounds} interleaved rounds, median ms; load average {os.getloadavg()[0]:.1f}")
    print("| config | M=1 ms | M=128 ms | M=128 / int8 rows | rows alone == in batch | declared invariant | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name in sessions:
        m1, m128 = (float(np.median(times[name][key])) for key in ("m1", "m128"))
        rows[name] |= {"m1_ms": round(m1, 4), "m128_ms": round(m128, 3), "m128_vs_int8_rows": round(m128 / base, 2)}
        r = rows[name]
        print(f"| {name} | {m1:.3f} | {m128:.2f} | {m128 / base:.2f} | {r['batch_invariant_measured']} | "
              f"{r['batch_invariant_declared']} | {r['rel_error']:.4f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"K": k, "N": n, "threads": 1, "clock": "cpu", "rounds": rounds,
                               "ort": ort.__version__, "configs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
