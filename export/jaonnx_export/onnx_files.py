"""Tracing to ONNX and writing the graph as the artifact's model.onnx (+ one data file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

ExternalData = Literal["auto", "always", "never"]
OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# "auto" keeps the weights inline only when there are next to none (a graph of shapes and ops).
# Otherwise they go to model.onnx.data, page-aligned: ONNX Runtime memory-maps an external data
# file at load, while inline weights are parsed out of the protobuf into anonymous memory (a
# second copy while loading: GPT-2 small int4 peaked at 336 MiB inline against 190 MiB mapped,
# and protobuf cannot hold more than 2 GiB anyway).
EXTERNAL_DATA_THRESHOLD = 1 << 20


def trace(wrapper: Any, adapter: Any, config: Any, target: Path) -> None:
    """The legacy TorchScript exporter (see export/EXPORTER.md for why not dynamo yet).

    Its DeprecationWarning is silenced here, deliberately: the decision is recorded there, and
    pyproject bounds torch below a release that might drop the path."""
    import warnings

    import torch

    inputs, outputs = adapter.names(config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(
            wrapper, adapter.example_inputs(config), str(target), input_names=inputs,
            output_names=outputs, dynamic_axes=adapter.dynamic_axes(config),
            opset_version=OPSET, dynamo=False,
        )


def _tensor_bytes(tensor: Any, base: Path) -> bytes:
    """Raw little-endian bytes of an initializer, read from its external file when it has one."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def save(traced: Path, out: Path, external_data: ExternalData) -> str | None:
    """Re-save the traced graph as `out`/model.onnx, with all weights in one relative data file
    unless asked not to or the graph has under EXTERNAL_DATA_THRESHOLD bytes of weights (the legacy
    exporter would scatter hundreds of files).

    Weights are streamed one tensor at a time, so this step never holds a second copy of them."""
    import onnx

    model = onnx.load(str(traced), load_external_data=False)
    sizes = [_tensor_size(t) for t in model.graph.initializer]
    use_external = external_data == "always" or (external_data == "auto" and sum(sizes) > EXTERNAL_DATA_THRESHOLD)
    if not use_external:
        onnx.load_external_data_for_model(model, str(traced.parent))
        onnx.save_model(model, str(out / MODEL_FILE))
        return None
    offset = 0
    with open(out / DATA_FILE, "wb") as data:
        for tensor, size in zip(model.graph.initializer, sizes):
            if size < 1024 and not onnx.external_data_helper.uses_external_data(tensor):
                continue
            raw = _tensor_bytes(tensor, traced.parent)
            padding = -offset % 4096  # page-aligned, so ORT can map each tensor
            data.write(b"\0" * padding)
            offset += padding
            data.write(raw)
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(name)
            del tensor.external_data[:]
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(raw)
    onnx.save_model(model, str(out / MODEL_FILE))
    return DATA_FILE


def _tensor_size(tensor: Any) -> int:
    """Bytes of an initializer, without loading external data."""
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def write_model(model: Any, dst: Path, data_file: str | None) -> None:
    """Write an in-memory `model` to `dst`, its weights in one `data_file` next to it when
    given: the one save of every graph a conversion rewrites (quantize, fp16, genai)."""
    import onnx

    if data_file:
        (dst.parent / data_file).unlink(missing_ok=True)  # save_model appends to an existing file
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
