"""Lower-precision artifacts (int8 for CPU, fp16 for CUDA), the offline optimizer, and the
quality report that says what the conversion cost against the fp32 PyTorch model.

int8 is done here, tensor by tensor, rather than with `onnxruntime.quantization.quantize_dynamic`:
that one holds several copies of the whole model (~17 GB for the 1B model on a 24 GB machine);
this one keeps only the int8 weights and the few fp32 tensors it does not touch in memory
(~2 GB for the 1B model). It emits the same kernel ORT's own fusion of `quantize_dynamic`'s
output ends in (`com.microsoft.DynamicQuantizeMatMul`), with per-output-channel weight scales.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.session import create_session
from jaonnx.tokenization import RecipeTokenizer

MIN_TOP1_AGREEMENT = 0.95  # below this an int8/fp16 artifact is an error unless forced
QUALITY_TEXTS = 64  # held-out sentences used for the quality report
MS_DOMAIN = "com.microsoft"
# Ops kept in fp32 in an fp16 graph: normalisations and softmax lose accuracy in fp16, and the
# rest have no fp16 kernel or feed integer/position logic.
# (ORT's fused SkipLayerNormalization/Attention kernels already accumulate in fp32 on CUDA, and
# blocking a multi-output fused node breaks the converter's casts, so those run in fp16.)
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "CumSum", "Range"]

Progress = Callable[[str], None]


# ---- int8 ---------------------------------------------------------------------------------


def _saturation_safe_range() -> bool:
    """On x86 without VNNI, MLAS's u8s8 kernel (vpmaddubsw) can saturate int16 sums of two
    products; 7-bit weights (reduce_range) avoid that. With VNNI or on ARM, use 8 bits."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx2" in flags and "vnni" not in flags


def quantize_weight(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (int8 weight, fp32 scale [N])."""
    limit = 63.0 if reduce_range else 127.0
    peak = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(peak > 0, peak / limit, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -limit, limit).astype(np.int8)
    return q, scale


def _array(tensor: Any, base: Path) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, base_dir=str(base))


def quantize_int8(src: Path, dst: Path, data_file: str | None, reduce_range: bool | None = None) -> dict[str, Any]:
    """Replace every MatMul/Gemm with a constant 2-D weight by DynamicQuantizeMatMul (int8
    weights, activations quantized at run time), folding a following bias Add into it.
    Embedding tables (Gather) stay fp32: they are lookups, not matrix products."""
    import onnx
    from onnx import helper, numpy_helper

    reduce_range = _saturation_safe_range() if reduce_range is None else reduce_range
    base = src.parent
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
    dropped: set[str] = set()
    skip: set[int] = set()
    quantized = 0
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
        weight = _array(inits[weight_name], base).astype(np.float32)
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        q, scale = quantize_weight(np.ascontiguousarray(weight), reduce_range)
        del weight
        stem = node.name or weight_name
        q_name, s_name = f"{weight_name}_int8", f"{weight_name}_scale"
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        uses[weight_name] -= 1
        if uses[weight_name] == 0:
            dropped.add(weight_name)
        bias, output = "", node.output[0]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
        else:
            # MatMul followed only by `Add(bias)`: fold the bias into the quantized kernel.
            after = consumers.get(output, [])
            if len(after) == 1 and after[0].op_type == "Add" and output not in graph_outputs:
                add = after[0]
                other = add.input[1] if add.input[0] == output else add.input[0]
                if other in inits and dims(other) == [q.shape[1]]:
                    bias, output = other, add.output[0]
                    skip.add(id(add))
        new_nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul", [node.input[0], q_name, s_name, "", bias] if bias else [node.input[0], q_name, s_name],
                [output], name=f"{stem}_quant", domain=MS_DOMAIN,
            )
        )
        quantized += 1
    # Every fp32 tensor still used is pulled into memory so the new file is self-contained.
    kept = []
    for tensor in graph.initializer:
        if tensor.name in dropped:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor = numpy_helper.from_array(_array(tensor, base), tensor.name)
        kept.append(tensor)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _save(model, dst, data_file)
    return {"method": "DynamicQuantizeMatMul, int8 per-channel weights", "matmuls_quantized": quantized,
            "reduce_range": reduce_range}


def _save(model: Any, dst: Path, data_file: str | None) -> None:
    import onnx

    if data_file:
        (dst.parent / data_file).unlink(missing_ok=True)  # save_model appends to an existing file
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


# ---- fp16 ---------------------------------------------------------------------------------


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
    _save(model, dst, data_file)
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


# ---- offline optimizer --------------------------------------------------------------------


def _feed(manifest: Manifest, session: Any, batch: int = 1, seq: int = 64) -> dict[str, np.ndarray]:
    """Synthetic inputs of a realistic shape for timing one graph against another."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, min(manifest.vocab_size, 3000), (batch, seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "mask_positions": np.full((batch, 1), seq // 2, dtype=np.int64)}  # one [MASK] per text
    if manifest.task == "text-generation":
        shape = manifest.decoder
        past = 64
        feed = {"input_ids": ids[:, :1], "attention_mask": np.ones((batch, past + 1), dtype=np.int64),
                "position_ids": np.full((batch, 1), past, dtype=np.int64), "logits_to_keep": np.array([1], dtype=np.int64)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                dtype = np.float16 if "float16" in i.type else np.float32
                feed[i.name] = rng.standard_normal((batch, shape.num_heads, past, shape.head_dim)).astype(dtype)
    return feed


def time_graph(path: Path, manifest: Manifest, repeat: int = 20) -> float:
    """Median ms of one run on CPU with the runtime's default session."""
    session = create_session(path, providers="cpu")
    feed = _feed(manifest, session)
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def optimize_graph(src: Path, dst: Path, manifest: Manifest, config: Any) -> dict[str, Any]:
    """Run ORT's offline transformer optimizer into `dst`; return the fusions it applied."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = "gpt2" if manifest.task == "text-generation" else "bert"
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    # opt_level=0: only the Python fusions; the session applies its own level-99 graph passes.
    optimized = optimize_model(str(src), model_type=model_type, num_heads=int(heads), hidden_size=int(hidden),
                               opt_level=0)
    fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(dst), use_external_data_format=dst.with_suffix(".onnx.data").exists()
                                 or src.with_suffix(".onnx.data").exists(), all_tensors_to_one_file=True)
    return {"model_type": model_type, "fusions": fusions}


# ---- quality report -------------------------------------------------------------------------


@dataclass
class Reference:
    """fp32 PyTorch logits on held-out sentences, computed once before any conversion."""

    task: str
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)  # bool, which logits rows count
    masks: list[np.ndarray] = field(default_factory=list)  # bool, the [MASK] rows (fill-mask)


def reference_logits(model: Any, manifest: Manifest, tokenizer: RecipeTokenizer, texts: list[str],
                     batch_size: int = 8) -> Reference:
    """Teacher-forced logits of the PyTorch model: masked LM on each sentence with its middle
    token masked; causal LM on each full sentence (every position)."""
    import torch

    from .parity import masked_batch, mlm_feed, prefill_feed, torch_masked_lm

    ref = Reference(manifest.task)
    if manifest.task == "fill-mask":
        for start in range(0, len(texts), batch_size):
            ids, mask = masked_batch(tokenizer, texts[start : start + batch_size])
            ref.feeds.append(mlm_feed(ids, mask))
            ref.logits.append(torch_masked_lm(model, tokenizer.recipe, ids, mask))
            ref.positions.append(mask.astype(bool))
            ref.masks.append(ids == tokenizer.mask_id)
        return ref
    for text in texts:
        ids = tokenizer.encode_text(text)[: manifest.max_positions]
        n = len(ids)
        if n < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits.numpy()
        ref.feeds.append(prefill_feed(manifest, ids))
        ref.logits.append(logits)
        ref.positions.append(np.ones((1, n), dtype=bool))
    return ref


def quality_report(path: Path, reference: Reference, input_dtypes: dict[str, str]) -> dict[str, Any]:
    """Max |logit diff| and top-1 agreement of the ONNX graph at `path` against `reference`."""
    session = create_session(path, providers="cpu")
    worst, agree, total, mask_agree, mask_total = 0.0, 0, 0, 0, 0
    for feed, expected, keep, masked in zip(reference.feeds, reference.logits, reference.positions,
                                            reference.masks or [None] * len(reference.feeds)):
        feed = {k: v.astype(input_dtypes.get(k, str(v.dtype))) if v.dtype.kind == "f" else v for k, v in feed.items()}
        got = session.run(["logits"], feed)[0].astype(np.float32)
        worst = max(worst, float(np.abs(got - expected)[keep].max()))
        same = got.argmax(-1) == expected.argmax(-1)
        agree += int(same[keep].sum())
        total += int(keep.sum())
        if masked is not None:
            mask_agree += int(same[masked].sum())
            mask_total += int(masked.sum())
    report: dict[str, Any] = {
        "reference": "fp32 PyTorch (transformers), held-out sentences",
        "texts": sum(f["input_ids"].shape[0] for f in reference.feeds),
        "tokens": total,
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / max(total, 1),
    }
    if mask_total:
        report["top1_agreement_at_mask"] = mask_agree / mask_total
    return report


def gate(report: dict[str, Any], precision: str, force: bool, threshold: float | None = None) -> None:
    """< 95% top-1 agreement is an error unless forced; the verdict is stored either way."""
    threshold = MIN_TOP1_AGREEMENT if threshold is None else threshold
    report["threshold"] = threshold
    report["passed"] = report["top1_agreement"] >= threshold
    if not report["passed"]:
        report["forced"] = force
        if not force:
            raise JaonnxError(
                f"{precision} artifact has top-1 agreement {report['top1_agreement']:.3f} with the fp32 model "
                f"(< {threshold:.2f}) and max |logit diff| {report['max_abs_logit_diff']:.3g}: "
                "it is not written; pass --force to keep it anyway"
            )


def describe(report: dict[str, Any]) -> str:
    """One line for the export's progress output."""
    line = (f"quality ({report.get('precision', '?')}): max |logit diff| {report['max_abs_logit_diff']:.3g}, "
            f"top-1 agreement {report['top1_agreement']:.4f} on {report['texts']} held-out texts")
    if "top1_agreement_at_mask" in report:
        line += f" (at [MASK] {report['top1_agreement_at_mask']:.4f})"
    return line
