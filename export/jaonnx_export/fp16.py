"""fp16 conversion for CUDA: fp16 weights and math, fp32 where fp16 loses accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .onnx_files import write_model

# Ops kept in fp32 in an fp16 graph: normalisations and softmax lose accuracy in fp16, and the
# rest have no fp16 kernel or feed integer/position logic.
# (ORT's fused SkipLayerNormalization/Attention kernels already accumulate in fp32 on CUDA, and
# blocking a multi-output fused node breaks the converter's casts, so those run in fp16.)
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "CumSum", "Range"]


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
    write_model(model, dst, data_file)
    return {"method": "onnxruntime.transformers.float16", "kept_fp32_ops": FP16_KEEP_FP32}
