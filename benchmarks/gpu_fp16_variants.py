"""GPU follow-up to gpu_decode.py (run on the same machine right after it, reusing its
/tmp/gd graphs): what the fp16 static graph loses to Casts and unfused ops.

Variants, each timed with the engine's StaticBatchDecoder (batch 1 and 8, context 64, 64 steps,
3 interleaved rounds): `base` (the exporter's fp16: LayerNorm kept fp32, so a Cast pair per
LayerNorm), `ln_fp16` (LayerNormalization left in fp16; it accumulates in fp32 internally),
`ln_fp16_fused` (then ORT's transformer optimizer: SkipLayerNormalization, bias+FastGelu).
Results: benchmarks/results/gpu.md.
"""
import sys, time, traceback
sys.path.insert(0, "benchmarks")
import onnxruntime as ort; ort.preload_dlls()
import onnx
from pathlib import Path
from types import SimpleNamespace
from gpu_decode import _io_dtypes, GPT_1B, engine_decode
from jaonnx.artifact import Manifest
from jaonnx_export import decoder_graph
from jaonnx_export import precision
from onnxruntime.transformers.float16 import convert_float_to_float16
def man(p):
    i, o = _io_dtypes(p)
    return Manifest(recipe="rinna-gpt-1b", task="text-generation", model_file="model.onnx", tokenizer_file="spiece.model", special_ids={}, vocab_size=44928, max_positions=1024, inputs=i, outputs=o, dtype="fp16", decoder=decoder_graph.decoder_shape(SimpleNamespace(**GPT_1B)))
paths = {"base": Path("/tmp/gd/fp16/model.onnx")}
t = time.time()
try:
    m = onnx.load("/tmp/gd/fp32/model.onnx")
    keep = [o for o in precision.FP16_KEEP_FP32 if o != "LayerNormalization"]
    m = convert_float_to_float16(m, keep_io_types=["logits"], op_block_list=keep, disable_shape_infer=True)
    Path("/tmp/gd/ln16").mkdir(exist_ok=True)
    onnx.save_model(m, "/tmp/gd/ln16/model.onnx", save_as_external_data=True, location="model.onnx.data")
    paths["ln_fp16"] = Path("/tmp/gd/ln16/model.onnx"); del m
    print("ln16 built", time.time() - t, flush=True)
    from onnxruntime.transformers import optimizer
    o = optimizer.optimize_model("/tmp/gd/ln16/model.onnx", model_type="gpt2", num_heads=16, hidden_size=2048, opt_level=0, use_gpu=True)
    print(o.get_fused_operator_statistics(), flush=True)
    Path("/tmp/gd/fused").mkdir(exist_ok=True)
    o.save_model_to_file("/tmp/gd/fused/model.onnx", use_external_data_format=True)
    paths["ln_fp16_fused"] = Path("/tmp/gd/fused/model.onnx")
    print("fused built", time.time() - t, flush=True)
except Exception:
    traceback.print_exc()
sess = {k: ort.InferenceSession(str(p), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]) for k, p in paths.items()}
mans = {k: man(p) for k, p in paths.items()}
for r in range(3):
    for k in paths:
        for b in (1, 8):
            print(r, k, f"b{b}", round(engine_decode(sess[k], mans[k], b, 64, 64), 3), flush=True)
