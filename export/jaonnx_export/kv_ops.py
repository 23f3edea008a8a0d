"""Builds the runtime's KV-cache surgery graphs (shipped in `jaonnx/generation/kv_ops/`).

The concat-layout cache lives in ONNX Runtime values (on the GPU with CUDA); joining and
leaving the running batch must not copy it through numpy. These two one-op-chain graphs do it
inside ONNX Runtime, on the cache's own device. The runtime does not depend on `onnx`, so the
graphs are built here and shipped as package data; a test rebuilds them and compares bytes.

    python -m jaonnx_export.kv_ops      # rewrite the shipped files
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
OPSET = 18
OUT_DIR = Path(__file__).resolve().parents[2] / "runtime" / "jaonnx" / "generation" / "kv_ops"


def _cache(name: str, elem: int, batch: str, length: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [batch, "heads", length, "head_dim"])


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def merge_graph(dtype: str) -> onnx.ModelProto:
    """merge(a [r1,H,w1,D], b [r2,H,w2,D]) -> [r1+r2, H, max(w1,w2), D], each left-padded with zeros."""
    elem = DTYPES[dtype]
    nodes = [_ints("c2", [2]), _ints("c3", [3]), _ints("z2", [0, 0]), _ints("z5", [0, 0, 0, 0, 0])]
    for x in ("a", "b"):
        nodes += [helper.make_node("Shape", [x], [f"{x}_shape"]),
                  helper.make_node("Slice", [f"{x}_shape", "c2", "c3"], [f"{x}_len"])]
    nodes.append(helper.make_node("Max", ["a_len", "b_len"], ["width"]))
    for x in ("a", "b"):
        nodes += [helper.make_node("Sub", ["width", f"{x}_len"], [f"{x}_missing"]),
                  helper.make_node("Concat", ["z2", f"{x}_missing", "z5"], [f"{x}_pads"], axis=0),
                  helper.make_node("Pad", [x, f"{x}_pads"], [f"{x}_padded"])]
    nodes.append(helper.make_node("Concat", ["a_padded", "b_padded"], ["merged"], axis=0))
    graph = helper.make_graph(
        nodes, "kv_merge", [_cache("a", elem, "r1", "w1"), _cache("b", elem, "r2", "w2")],
        [_cache("merged", elem, "rows", "width")],
    )
    return _model(graph)


def select_graph(dtype: str) -> onnx.ModelProto:
    """select(x [r,H,w,D], rows [k], start [1], end [1]) -> x[rows][:, :, start:end]."""
    elem = DTYPES[dtype]
    nodes = [_ints("axis2", [2]),
             helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
             helper.make_node("Slice", ["picked", "start", "end", "axis2"], ["selected"])]
    index = [helper.make_tensor_value_info(n, TensorProto.INT64, [d]) for n, d in (("rows", "k"), ("start", 1), ("end", 1))]
    graph = helper.make_graph(nodes, "kv_select", [_cache("x", elem, "r", "w"), *index],
                              [_cache("selected", elem, "k", "length")])
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaonnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_all() -> dict[str, bytes]:
    """file name -> serialized graph, for every op and cache dtype."""
    return {
        f"{op}_{dtype}.onnx": build(dtype).SerializeToString()
        for op, build in (("merge", merge_graph), ("select", select_graph))
        for dtype in DTYPES
    }


def write(directory: Path = OUT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in build_all().items():
        (directory / name).write_bytes(data)
        paths.append(directory / name)
    return paths


if __name__ == "__main__":
    for path in write():
        print(path)
