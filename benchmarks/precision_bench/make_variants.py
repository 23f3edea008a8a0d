"""fp32 artifact -> quantized variants with the export's own quantize code (no quality gate:
timing artifacts of random weights). Each NAME=OPTIONS makes OUT_ROOT/NAME.

    python make_variants.py FP32_ARTIFACT OUT_ROOT int8 int4:block=32:lm_head=int8:head_kernel=blocks:symmetric=0:accuracy_level=4 int8:kernel=blocks ...
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from jaonnx.artifact import read_manifest
from jaonnx_export import quantize

src, root = Path(sys.argv[1]), Path(sys.argv[2])
manifest = read_manifest(src)
for spec in sys.argv[3:]:
    kind, *pairs = spec.split(":")
    options = dict(p.split("=") for p in pairs)
    out = root / spec.replace(":", "-").replace("=", "")
    if (out / "jaonnx.json").exists():
        continue
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / manifest.tokenizer_file, out / manifest.tokenizer_file)
    data = manifest.external_data
    if kind == "int8":
        report = quantize.quantize_int8(src / manifest.model_file, out / manifest.model_file, data,
                                        vocab_size=manifest.vocab_size, embedding=options.get("embedding"),
                                        kernel=options.get("kernel", "rows"))
    else:
        report = quantize.quantize_int4(
            src / manifest.model_file, out / manifest.model_file, data, manifest.vocab_size,
            options.get("lm_head", "int8"), int(options.get("block", 32)),
            symmetric=options.get("symmetric", "0") == "1", accuracy_level=int(options.get("accuracy_level", 4)),
            embedding=options.get("embedding"), head_kernel=options.get("head_kernel", "rows"))
    m = read_manifest(src)
    m.quantization, m.batch_invariant = kind, report["batch_invariant"]
    m.quality = {"conversion": report}
    m.write(out)
    print(spec, report, flush=True)
