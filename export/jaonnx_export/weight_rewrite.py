"""The streaming graph walk behind int8 and int4: every weight product (MatMul/Gemm with a
constant 2-D weight, plus a following bias Add) is replaced by what a `Linear` builds.

Done here, tensor by tensor, rather than with onnxruntime's `quantize_dynamic` /
`MatMulNBitsQuantizer`: those hold several copies of the whole model (~17 GB for the 1B
model); this keeps only one fp32 weight in memory at a time and, with a data file, writes
every new or kept tensor straight to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .linear_ops import MS_DOMAIN, Linear, QuantizedTable
from .onnx_files import write_model


def default_opset(src: Path) -> int:
    """The graph's default-domain opset (node forms differ across opsets)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def _array(tensor: Any, base: Path) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=str(base))


def rewrite_weight_products(src: Path, dst: Path, data_file: str | None, choose: Callable[[int, int], Linear | None],
                            choose_table: Callable[[int, int], QuantizedTable | None] | None = None) -> int:
    """Replace every MatMul/Gemm with a constant 2-D weight by the nodes `choose(K, N)` builds
    for it (None: leave it), folding a following bias Add, and every Gather from a constant
    [V, H] table by what `choose_table(V, H)` builds. Streams: one fp32 weight in memory at a
    time, and with a data file every new or kept tensor goes straight to disk (_Sink)."""
    import onnx
    from onnx import helper, numpy_helper

    base = src.parent
    if data_file and (dst.parent / data_file).resolve() == (base / data_file).resolve():
        raise ValueError(f"quantizing {src} into its own directory would overwrite its weights")
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def dims(name: str) -> list[int]:
        return list(inits[name].dims)

    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    sink = _Sink(dst, data_file)
    dropped: set[str] = set()
    skip: set[int] = set()
    count = 0
    for node in graph.node:
        if id(node) in skip:
            continue
        if node.op_type == "Gather" and choose_table is not None and node.input[0] in inits:
            table_name = node.input[0]
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            table = choose_table(*dims(table_name)) if len(dims(table_name)) == 2 and axis == 0 else None
            if table is None:
                new_nodes.append(node)
                continue
            uses[table_name] -= 1
            if uses[table_name] == 0:
                dropped.add(table_name)
            values = _array(inits[table_name], base).astype(np.float32, copy=False)
            nodes, tensors = table(node.input[1], values, node.output[0], node.name or table_name)
            del values
            new_nodes += nodes
            new_inits += [sink.put(t) for t in tensors]
            continue
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("MatMul", "Gemm") or weight_name not in inits or len(dims(weight_name)) != 2:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        k, n = dims(weight_name)[::-1] if node.op_type == "Gemm" and attrs.get("transB", 0) else dims(weight_name)
        make = choose(k, n)
        if make is None:
            new_nodes.append(node)
            continue
        weight = _array(inits[weight_name], base).astype(np.float32, copy=False)
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        uses[weight_name] -= 1
        if uses[weight_name] == 0:
            dropped.add(weight_name)
        bias, output = "", node.output[0]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
        else:
            after = consumers.get(output, [])
            if len(after) == 1 and after[0].op_type == "Add" and output not in graph_outputs:
                add = after[0]
                other = add.input[1] if add.input[0] == output else add.input[0]
                if other in inits and dims(other) == [n]:
                    bias, output = other, add.output[0]
                    skip.add(id(add))
        nodes, tensors = make(node.input[0], np.ascontiguousarray(weight), bias, output, node.name or weight_name)
        del weight
        new_nodes += nodes
        new_inits += [sink.put(t) for t in tensors]
        count += 1
    kept = []
    for tensor in graph.initializer:
        if tensor.name in dropped:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor = sink.copy(tensor, base) if sink.file else numpy_helper.from_array(_array(tensor, base), tensor.name)
        kept.append(tensor)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    sink.close()
    write_model(model, dst, None)  # the proto only: with a data file, the sink already wrote the weights
    return count


class _Sink:
    """Where new tensors go: straight into `data_file` beside `dst` as they are made (so only
    one weight is ever in memory), or kept in the proto when the model has no data file."""

    def __init__(self, dst: Path, data_file: str | None) -> None:
        self.name = data_file
        self.file = None
        if data_file:
            path = dst.parent / data_file
            path.unlink(missing_ok=True)
            self.file = open(path, "wb")  # noqa: SIM115  (closed by close())

    def put(self, tensor: Any) -> Any:
        if self.file is None or len(tensor.raw_data) < 1024:
            return tensor
        import onnx

        offset = self.file.tell()
        self.file.write(tensor.raw_data)
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        return tensor

    def copy(self, tensor: Any, base: Path, chunk: int = 64 << 20) -> Any:
        """An untouched external tensor: its bytes copied file to file, never all in memory."""
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        start = self.file.tell()
        with open(base / info["location"], "rb") as source:
            source.seek(offset)
            left = length
            while left:
                block = source.read(min(chunk, left))
                self.file.write(block)
                left -= len(block)
        del tensor.external_data[:]
        for key, value in (("location", self.name), ("offset", str(start)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
