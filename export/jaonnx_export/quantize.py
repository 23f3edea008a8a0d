"""Lower-precision graph rewrites: int8 and int4 weights for CPU, fp16 for CUDA.

int8 and int4 are done here, tensor by tensor, rather than with onnxruntime's
`quantize_dynamic` / `MatMulNBitsQuantizer`: those hold several copies of the whole model
(~17 GB for the 1B model); this keeps only the quantized weights and the few fp32 tensors it
does not touch in memory. Each emits the kernel ORT itself would end in:
`com.microsoft.DynamicQuantizeMatMul` (int8 per output channel) and `com.microsoft.MatMulNBits`
(int4 blocks, int8 compute with accuracy_level=4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
# Ops kept in fp32 in an fp16 graph: normalisations and softmax lose accuracy in fp16, and the
# rest have no fp16 kernel or feed integer/position logic.
# (ORT's fused SkipLayerNormalization/Attention kernels already accumulate in fp32 on CUDA, and
# blocking a multi-output fused node breaks the converter's casts, so those run in fp16.)
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "CumSum", "Range"]
# int4 block size along K. 32 and 128 were measured (see notes/precision-readme.md): 32 keeps
# the trained twins' top-1 agreement higher at the same decode speed within noise.
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations x int4 weights (MLAS sqnbitgemm CompInt8)
# int8 reduce_range: 7-bit weights. MLAS's u8s8 kernel on x86 without VNNI (vpmaddubsw) can
# saturate int16 sums of two 8-bit products; 7 bits cannot. Measured: same speed, and the twins'
# top-1 agreement stays >= 0.99, so every artifact uses the setting that is exact on every CPU.
PORTABLE_REDUCE_RANGE = True


# ---- weight codecs ----------------------------------------------------------------------------


COLUMNS = 4096  # output columns coded at a time: bounds the float temporaries of a big LM head


def quantize_weight(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (int8 weight, fp32 scale [N])."""
    if weight.shape[1] > COLUMNS:
        parts = [quantize_weight(weight[:, i : i + COLUMNS], reduce_range) for i in range(0, weight.shape[1], COLUMNS)]
        return np.concatenate([q for q, _ in parts], axis=1), np.concatenate([s for _, s in parts])
    limit = 63.0 if reduce_range else 127.0
    peak = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(peak > 0, peak / limit, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -limit, limit).astype(np.int8)
    return q, scale


def pack_int4(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit blocks along K of a [K, N] weight, in MatMulNBits' layout:
    (packed uint8 [N, K/block, block/2] low nibble first, fp32 scales [N, K/block],
    packed uint8 zero points [N, ceil(K/block / 2)])."""
    k, n = weight.shape
    if n > COLUMNS:
        parts = [pack_int4(weight[:, i : i + COLUMNS], block) for i in range(0, n, COLUMNS)]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), dtype=np.float32)
    padded[:k] = weight
    w = padded.T.reshape(n, blocks, block)  # [N, blocks, block]
    low = np.minimum(w.min(axis=2), 0.0)
    high = np.maximum(w.max(axis=2), 0.0)
    scale = ((high - low) / 15.0).astype(np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)  # [N, blocks]
    q = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    zero_packed = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale, zero_packed


def unpack_int4(packed: np.ndarray, scale: np.ndarray, zero_packed: np.ndarray, k: int) -> np.ndarray:
    """The fp32 [K, N] weight a MatMulNBits node computes with (for tests and reports)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, half * 2), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    zero = np.empty((n, zero_packed.shape[1] * 2), dtype=np.float32)
    zero[:, 0::2] = zero_packed & 0x0F
    zero[:, 1::2] = zero_packed >> 4
    w = (q - zero[:, :blocks, None]) * scale[..., None]
    return w.reshape(n, -1)[:, :k].T


# ---- the graph walk shared by int8 and int4 --------------------------------------------------


def _array(tensor: Any, base: Path) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=str(base))


# (node input, weight [K, N] fp32, bias name or "", output name, node name) -> new nodes + inits
Rewrite = Callable[[str, np.ndarray, str, str, str], tuple[list[Any], list[Any]]]


def _rewrite_weight_products(src: Path, dst: Path, data_file: str | None, rewrite: Callable[[int, int], Rewrite | None]) -> int:
    """Replace every MatMul/Gemm with a constant 2-D weight by what `rewrite(K, N)` returns for
    it (None: leave it), folding a following bias Add. Streams: one fp32 weight in memory at a
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
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("MatMul", "Gemm") or weight_name not in inits or len(dims(weight_name)) != 2:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        k, n = dims(weight_name)[::-1] if node.op_type == "Gemm" and attrs.get("transB", 0) else dims(weight_name)
        make = rewrite(k, n)
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
    if data_file:
        onnx.save_model(model, str(dst))  # the weights are already in data_file
    else:
        save(model, dst, None)
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


def _int8_rewrite(reduce_range: bool) -> Rewrite:
    from onnx import helper, numpy_helper

    def make(x: str, weight: np.ndarray, bias: str, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        q, scale = quantize_weight(weight, reduce_range)
        q_name, s_name = f"{stem}_int8", f"{stem}_scale"
        inputs = [x, q_name, s_name, "", bias] if bias else [x, q_name, s_name]
        node = helper.make_node("DynamicQuantizeMatMul", inputs, [output], name=f"{stem}_quant", domain=MS_DOMAIN)
        return [node], [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]

    return make


def _int4_rewrite(block: int) -> Rewrite:
    from onnx import helper, numpy_helper

    def make(x: str, weight: np.ndarray, bias: str, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        k, n = weight.shape
        packed, scale, zero = pack_int4(weight, block)
        names = [f"{stem}_int4", f"{stem}_int4_scale", f"{stem}_int4_zero"]
        inputs = [x, *names, "", bias] if bias else [x, *names]
        node = helper.make_node(
            "MatMulNBits", inputs, [output], name=f"{stem}_nbits", domain=MS_DOMAIN,
            K=k, N=n, bits=4, block_size=block, accuracy_level=INT4_ACCURACY_LEVEL,
        )
        arrays = [packed, scale, zero]
        return [node], [numpy_helper.from_array(a, name) for a, name in zip(arrays, names)]

    return make


def quantize_int8(src: Path, dst: Path, data_file: str | None, reduce_range: bool | None = None) -> dict[str, Any]:
    """Every MatMul/Gemm with a constant 2-D weight -> DynamicQuantizeMatMul (int8 weights,
    activations quantized at run time). Embedding tables (Gather) stay fp32: they are lookups."""
    reduce_range = PORTABLE_REDUCE_RANGE if reduce_range is None else reduce_range
    count = _rewrite_weight_products(src, dst, data_file, lambda k, n: _int8_rewrite(reduce_range))
    return {"method": "DynamicQuantizeMatMul, int8 per-channel weights", "matmuls_quantized": count,
            "reduce_range": reduce_range}


def quantize_int4(src: Path, dst: Path, data_file: str | None, vocab_size: int, lm_head: str = "int8",
                  block: int = INT4_BLOCK, reduce_range: bool | None = None) -> dict[str, Any]:
    """Weight-only int4 (MatMulNBits, asymmetric blocks of `block` along K, accuracy_level=4)
    for every weight product; the LM head (the product with N == vocab_size) is int4, int8
    (DynamicQuantizeMatMul) or fp32 as `lm_head` says. Embedding gathers stay fp32."""
    if lm_head not in ("int4", "int8", "fp32"):
        from jaonnx.errors import JaonnxError

        raise JaonnxError(f"the int4 LM head must be int4, int8 or fp32, not {lm_head!r}")
    reduce_range = PORTABLE_REDUCE_RANGE if reduce_range is None else reduce_range
    int4, int8 = _int4_rewrite(block), _int8_rewrite(reduce_range)
    heads: list[int] = []

    def choose(k: int, n: int) -> Rewrite | None:
        if n != vocab_size:
            return int4
        heads.append(n)
        return {"int4": int4, "int8": int8, "fp32": None}[lm_head]

    count = _rewrite_weight_products(src, dst, data_file, choose)
    report: dict[str, Any] = {"method": f"MatMulNBits, int4 blocks of {block}, accuracy_level={INT4_ACCURACY_LEVEL}",
                              "matmuls_quantized": count, "block_size": block, "lm_head": lm_head if heads else None}
    if heads and lm_head == "int8":
        report["reduce_range"] = reduce_range
    return report


def save(model: Any, dst: Path, data_file: str | None) -> None:
    """Write `model` to `dst`, weights in one `data_file` next to it when given."""
    import onnx

    if data_file:
        (dst.parent / data_file).unlink(missing_ok=True)  # save_model appends to an existing file
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


# ---- fp16 ---------------------------------------------------------------------------------------


def convert_fp16(src: Path, dst: Path, data_file: str | None) -> dict[str, Any]:
    """fp16 weights and math, fp32 where fp16 loses accuracy (FP16_KEEP_FP32). Logits stay fp32
    (callers softmax them); the KV cache is fp16 in and out, so a decoder keeps it on the
    device in one dtype step after step."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter needs value types to place its casts; infer them on disk (works above 2 GB).
    inferred = dst.parent / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    model = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    inferred.unlink()
    model = convert_float_to_float16(
        model, keep_io_types=["logits"], op_block_list=FP16_KEEP_FP32, disable_shape_infer=True,
    )
    save(model, dst, data_file)
    return {"method": "onnxruntime.transformers.float16", "kept_fp32_ops": FP16_KEEP_FP32}


def io_dtypes(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The graph's own input/output element types, for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    name = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
            onnx.TensorProto.INT32: "int32", onnx.TensorProto.BFLOAT16: "bfloat16"}

    def table(values: Any) -> dict[str, str]:
        return {v.name: name.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)) for v in values}

    return table(model.graph.input), table(model.graph.output)


def node_counts(path: Path) -> dict[str, int]:
    """op type -> count, for the quality report's before/after of fusions."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
