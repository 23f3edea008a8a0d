"""Read-only facts about a saved graph, for the manifest and the quality report."""

from __future__ import annotations

from pathlib import Path


def io_dtypes(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The graph's own input/output element types, for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    name = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
            onnx.TensorProto.INT32: "int32", onnx.TensorProto.BFLOAT16: "bfloat16"}

    def table(values: object) -> dict[str, str]:
        return {v.name: name.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)) for v in values}  # type: ignore[attr-defined]

    return table(model.graph.input), table(model.graph.output)


def node_counts(path: Path) -> dict[str, int]:
    """op type -> count, for the quality report's before/after of fusions."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
