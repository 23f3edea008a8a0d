"""fp32 artifact -> optimized and/or int8/fp16 artifact, gated on its quality report.

Everything here runs on ONNX files and on PyTorch reference logits computed beforehand: the
PyTorch model is already freed when conversion starts.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError

from .onnx_files import DATA_FILE, MODEL_FILE

Progress = Callable[[str], None]


def untie_lm_head(model: Any) -> None:
    """Give the LM head its own copy of a tied embedding: a head that reads the shared table
    (through a Transpose) is left fp32 by int8 quantization, which halves int8 decode speed."""
    import torch

    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def convert(
    config: Any, reference: Any, out: Path, manifest: Manifest, quantize: str | None, dtype: str,
    optimize: bool, force: bool, step: Progress,
) -> None:
    """fp32 artifact in `out` (a scratch directory) -> the converted one, with its quality report."""
    from . import precision

    precision_name = quantize or dtype
    data_file = manifest.external_data
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        candidates = {"plain": out / MODEL_FILE}
        optimization: dict[str, Any] = {}
        if optimize:
            step("running the ONNX Runtime transformer optimizer")
            target = Path(tmp) / "optimized" / MODEL_FILE
            target.parent.mkdir()
            try:
                optimization = precision.optimize_graph(out / MODEL_FILE, target, manifest, config)
                candidates["optimized"] = target
            except Exception as exc:  # the optimizer crashes on some graphs (see export-notes)
                optimization = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
        finals: dict[str, Path] = {}
        conversion: dict[str, Any] = {}
        for name, path in candidates.items():
            if precision_name == "fp32":
                finals[name] = path
                continue
            target = Path(tmp) / f"{name}-{precision_name}" / MODEL_FILE
            target.parent.mkdir()
            step(f"converting the {name} graph to {precision_name}")
            if quantize:
                conversion = precision.quantize_int8(path, target, data_file)
            else:
                conversion = precision.convert_fp16(path, target, data_file)
            finals[name] = target
        chosen = "plain"
        if "optimized" in finals:
            timings: dict[str, float] = {}
            for name, path in finals.items():
                try:
                    timings[name] = precision.time_graph(path, manifest)
                except JaonnxError as exc:  # e.g. fused nodes the fp16 converter cannot cast around
                    optimization["error"] = str(exc)[:300]
                    timings[name] = float("inf")
            faster = timings["optimized"] < 0.97 * timings["plain"]
            chosen = "optimized" if faster else "plain"
            optimization |= {"applied": faster, "cpu_ms": {k: (v if v != float("inf") else None) for k, v in timings.items()},
                             "note": "kept only when >3% faster than the session's own optimizations"}
            step(f"optimizer: {timings['plain']:.2f} ms plain vs {timings['optimized']:.2f} ms optimized "
                 f"-> {'kept' if faster else 'dropped'}; fusions {optimization.get('fusions', {})}")
        elif optimization:
            optimization["applied"] = False
        source_file = finals[chosen]
        if source_file != out / MODEL_FILE:
            for stale in (out / MODEL_FILE, out / DATA_FILE):
                stale.unlink(missing_ok=True)
            shutil.move(str(source_file), out / MODEL_FILE)
            moved_data = source_file.parent / DATA_FILE
            if moved_data.exists():
                shutil.move(str(moved_data), out / DATA_FILE)
            manifest.external_data = DATA_FILE if (out / DATA_FILE).exists() else None
    manifest.inputs, manifest.outputs = precision.io_dtypes(out / MODEL_FILE)
    manifest.dtype = dtype
    manifest.quantization = quantize
    step(f"checking {precision_name} quality against PyTorch on held-out text")
    report = precision.quality_report(out / MODEL_FILE, reference, manifest.inputs)
    report = {"precision": precision_name, **report, **({"conversion": conversion} if conversion else {})}
    if optimization:
        report["optimization"] = optimization
    step(precision.describe(report))
    precision.gate(report, precision_name, force)  # raises: the scratch directory is discarded
    manifest.quality = report
