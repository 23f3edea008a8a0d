"""fp32 artifact of a real shape -> the precision/fusion variants timed by bench.py, built with
the export's own quantize/optimize code (no quality gate: the weights are random).

    python variants.py FP32_ARTIFACT PREFIX OUT_ROOT
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from jaonnx.artifact import read_manifest
from jaonnx_export import genai, optimize, quantize

src, prefix, root = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
manifest = read_manifest(src)
d = manifest.decoder
config = SimpleNamespace(hidden_size=d.num_heads * d.head_dim if d else 768, num_attention_heads=d.num_heads if d else 12)
data = manifest.external_data


def place(name: str) -> Path:
    out = root / f"{prefix}-{name}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in ("jaonnx.json", manifest.tokenizer_file):
        shutil.copy(src / f, out / f)
    return out


fused = root / f"{prefix}-fp32-fused"
base = {"fp32": src / "model.onnx"}
out = place("fp32-fused")
print("fusions", optimize.optimize_graph(src / "model.onnx", out / "model.onnx", manifest, config)["fusions"])
base["fp32-fused"] = out / "model.onnx"
if d is None:
    out = place("fp32-fused-noattn")
    optimize.optimize_graph(src / "model.onnx", out / "model.onnx", manifest, config, attention=False)
    base["fp32-fused-noattn"] = out / "model.onnx"
out = place("fp32")
shutil.copy(src / "model.onnx", out / "model.onnx")
if data:
    shutil.copy(src / data, out / data)
jobs = {"int8": lambda s, t: quantize.quantize_int8(s, t, data),
        "int8-rr0": lambda s, t: quantize.quantize_int8(s, t, data, reduce_range=False),
        "int4-b32": lambda s, t: quantize.quantize_int4(s, t, data, manifest.vocab_size, "int8", 32),
        "int4-b128": lambda s, t: quantize.quantize_int4(s, t, data, manifest.vocab_size, "int8", 128),
        "int4-b32-head4": lambda s, t: quantize.quantize_int4(s, t, data, manifest.vocab_size, "int4", 32)}
for name, job in jobs.items():
    for graph in [g for g in base if g != "fp32"] + ["fp32"]:
        if graph != "fp32" and any(k in name for k in ("head4", "b128", "rr0")):
            continue
        suffix = graph.replace("fp32", "")
        out = place(name + suffix)
        job(base[graph], out / "model.onnx")
        print(name + suffix, "done", flush=True)
for name in ("fp32", "int8", "int4-b32"):
    out = root / f"{prefix}-{name}"
    m = read_manifest(out) if (out / "jaonnx.json").exists() else manifest
    m.external_data = "model.onnx.data" if (out / "model.onnx.data").exists() else None
    genai.write_genai_files(out, m, config)
