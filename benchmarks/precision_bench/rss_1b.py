"""Peak RSS of the streaming int8/int4 quantizers on a graph with the japanese-gpt-1b shape's
weight products (24 layers, hidden 2048, inner 8192, vocab 44928: 1.39 B weights, 5.6 GB fp32
in external data). The graph is a plain chain of MatMuls: what the quantizer walks is the same.

    python rss_1b.py build DIR ; python rss_1b.py int4|int8 DIR
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

H, INNER, LAYERS, VOCAB = 2048, 8192, 24, 44928


def build(d: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32) * 0.02
    nodes, inits = [], []
    data = open(d / "model.onnx.data", "wb")

    def external(array: np.ndarray, name: str) -> onnx.TensorProto:
        """Append to the data file as we go: never more than one weight in memory."""
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        offset = data.tell()
        data.write(array.tobytes())
        for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        return tensor

    x = "h0"
    nodes.append(helper.make_node("Gather", ["wte", "input_ids"], [x]))
    inits.append(external(np.resize(block, (VOCAB, H)), "wte"))
    for layer in range(LAYERS):
        for name, (k, n) in {"qkv": (H, 3 * H), "proj": (H, H), "fc": (H, INNER), "fc2": (INNER, H)}.items():
            w = f"l{layer}.{name}"
            inits.append(external(np.resize(block, (k, n)), w))
            y = f"{w}.out"
            nodes.append(helper.make_node("MatMul", [x if name != "fc2" and name != "proj" else prev, w], [y]))
            if name in ("qkv", "fc"):
                prev = f"{y}.s"
                nodes.append(helper.make_node("Slice", [y, "zero", "h", "minus1"], [prev]) if name == "qkv"
                             else helper.make_node("Relu", [y], [prev]))
            else:
                x = y
    inits += [numpy_helper.from_array(np.array([0]), "zero"), numpy_helper.from_array(np.array([H]), "h"),
              numpy_helper.from_array(np.array([-1]), "minus1"),
              external(np.resize(block, (H, VOCAB)), "lm_head")]
    data.close()
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "gpt1b", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(d / "model.onnx"))


def run(kind: str, d: Path) -> None:
    from jaonnx_export import quantize

    out = d / kind
    out.mkdir(exist_ok=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if kind == "int4":
        report = quantize.quantize_int4(d / "model.onnx", out / "model.onnx", "model.onnx.data", VOCAB)
    else:
        report = quantize.quantize_int8(d / "model.onnx", out / "model.onnx", "model.onnx.data")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{kind}: peak RSS {peak:.0f} MiB (before {base:.0f} MiB), output {size:.0f} MiB, "
          f"{time.perf_counter() - start:.0f} s, {report['matmuls_quantized']} products")


if __name__ == "__main__":
    (build if sys.argv[1] == "build" else lambda d: run(sys.argv[1], d))(Path(sys.argv[2]))
