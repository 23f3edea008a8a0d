"""ORT's fused SkipLayerNormalization against Add + LayerNormalization on the CPU, at 1 row
(decode) and 128 rows (prefill) of 768: why CPU static decoder graphs are built plain
(architectures.py). CPU time at 1 intra-op thread, graph optimizations off so ORT cannot
re-fuse the plain pair.

    python skip_layernorm.py [HIDDEN]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

H = int(sys.argv[1]) if len(sys.argv) > 1 else 768


def session(fused: bool) -> ort.InferenceSession:
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "S", H]) for n in ("x", "s")]
    inits = [numpy_helper.from_array(np.ones(H, np.float32), "g"), numpy_helper.from_array(np.zeros(H, np.float32), "b")]
    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"], domain="com.microsoft",
                                  epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Add", ["x", "s"], ["a"]),
                 helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


sessions = {"SkipLayerNormalization": session(True), "Add + LayerNormalization": session(False)}
rng = np.random.default_rng(0)
for rows in (1, 128):
    feed = {"x": rng.standard_normal((1, rows, H)).astype(np.float32), "s": rng.standard_normal((1, rows, H)).astype(np.float32)}
    outs = {}
    for name, s in sessions.items():
        outs[name] = s.run(None, feed)[0]
        best = float("inf")
        for _ in range(5):
            t = time.process_time()
            for _ in range(100):
                s.run(None, feed)
            best = min(best, (time.process_time() - t) / 100 * 1e3)
        print(f"{rows:4d} rows  {name:26s} {best:.4f} ms (CPU, best of 5)")
    a, b = outs.values()
    print(f"     max |difference| {np.abs(a - b).max():.2e}")
