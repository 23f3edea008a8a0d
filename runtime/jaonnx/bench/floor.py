"""The decode floor: batch-1 decode reads every weight once per token (and the KV cache once),
so ms/token cannot go below (bytes read per token) / (read bandwidth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOOKUPS = frozenset({"Gather", "GatherBlockQuantized"})  # ops that read one row of a table per token
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2, 21: 1, 22: 1}  # onnx TensorProto types


def weight_bytes(model_path: str | Path) -> tuple[int, str]:
    """(bytes a decode step reads from the weights, how it was counted).

    With the `onnx` package: every initializer except tables read only through lookups
    (`Gather`, or `GatherBlockQuantized` for a quantized table with its scales and zero points):
    an embedding lookup reads one row per token. Without it: the model files' size, an upper bound."""
    model_path = Path(model_path)
    try:
        import onnx
    except ImportError:
        files = [model_path, model_path.with_name(model_path.name + ".data")]
        return sum(f.stat().st_size for f in files if f.is_file()), "file size (upper bound: onnx not installed)"
    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name)
        if ops and ops <= LOOKUPS:
            continue
        total += _tensor_bytes(init)
    return total, "initializers except lookup-only (Gather) tables"


def _tensor_bytes(t: Any) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    count = 1
    for d in t.dims:
        count *= d
    return count * _ITEMSIZE.get(t.data_type, 4)


def kv_bytes(decoder: Any, context: int, dtype: str = "fp32", batch: int = 1) -> int:
    """Bytes of keys and values one decode step reads at `context` (all layers)."""
    item = 2 if dtype == "fp16" else 4
    return 2 * decoder.num_layers * decoder.num_heads * decoder.head_dim * context * item * batch


def floor_ms(read_bytes: int, bandwidth_gbs: float) -> float:
    return read_bytes / (bandwidth_gbs * 1e9) * 1000
