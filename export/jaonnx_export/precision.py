"""The conversion step of an export: the checked fp32 graph -> the artifact's final graph.

It quantizes (int8 / int4) or converts (fp16) as asked, tries ORT's offline fusions and keeps
them only where interleaved timing shows them faster (the default), and gates the result on a
quality report against the fp32 PyTorch model. The pieces live in quantize.py, fp16.py,
optimize.py and quality.py; this module only orders them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError

from . import optimize as optimizer
from . import quality
from . import quantize as rewrite
from .fp16 import convert_fp16
from .graph_info import io_dtypes, node_counts
from .quality import MIN_TOP1_AGREEMENT  # noqa: F401  (re-exported for callers)

QUALITY_TEXTS = quality.QUALITY_TEXTS  # held-out sentences in the report (benchmarks lower it)

Progress = Callable[[str], None]
QUANTIZATIONS = ("int8", "int4")
LM_HEADS = ("int4", "int8", "fp32")
EMBEDDINGS = ("int8", "int4", "fp32")
INT4_BLOCKS = (16, 32, 64, 128, 256)


@dataclass
class Options:
    """What the user asked for. `optimize`: None = measure and keep fusions only where faster
    (the default), True = always fuse, False = never."""

    quantize: str | None = None
    dtype: str = "fp32"
    optimize: bool | None = None
    force: bool = False
    int4_block: int = rewrite.INT4_BLOCK
    lm_head: str = "int8"  # int4 artifacts: the LM head's precision
    # int8/int4 artifacts: the token embedding table's precision. None: int8 for decoders (a
    # quarter of the fp32 table's bytes, no measurable decode cost), fp32 for encoders.
    embedding: str | None = None

    @property
    def name(self) -> str:
        return self.quantize or self.dtype

    @property
    def needs_even_rows(self) -> bool:
        """int4 blocks that are batch-invariant only when every product sees an even row count
        (linear_ops.NBitBlocks): the decoder graph then pads its rows (decoder_graph.py)."""
        return self.quantize == "int4" and not rewrite.NBitBlocks(self.int4_block, rewrite.INT4_ACCURACY_LEVEL).batch_invariant

    def check(self) -> None:
        """One-line errors for options that do not exist or do not combine."""
        if self.quantize not in (None, *QUANTIZATIONS):
            raise JaonnxError(f"--quantize must be int8 or int4, not {self.quantize!r}")
        if self.dtype not in ("fp32", "fp16"):
            raise JaonnxError(f"--dtype must be fp32 or fp16, not {self.dtype!r}")
        if self.quantize and self.dtype != "fp32":
            raise JaonnxError(f"--quantize {self.quantize} and --dtype fp16 do not combine: "
                              "int8/int4 are for CPU, fp16 for CUDA")
        if self.int4_block not in INT4_BLOCKS:
            raise JaonnxError(f"--int4-block must be a power of two from 16 to 256, not {self.int4_block}")
        if self.lm_head not in LM_HEADS:
            raise JaonnxError(f"--lm-head must be int4, int8 or fp32, not {self.lm_head!r}")
        if self.embedding not in (None, *EMBEDDINGS):
            raise JaonnxError(f"--embedding must be int8, int4 or fp32, not {self.embedding!r}")


def _convert_one(path: Path, target: Path, manifest: Manifest, options: Options, data_file: str | None) -> dict[str, Any]:
    embedding = options.embedding or ("int8" if manifest.decoder is not None else "fp32")
    if options.quantize == "int8":
        return rewrite.quantize_int8(path, target, data_file, vocab_size=manifest.vocab_size,
                                     embedding=embedding)
    if options.quantize == "int4":
        return rewrite.quantize_int4(path, target, data_file, manifest.vocab_size, options.lm_head, options.int4_block,
                                     embedding=embedding)
    if options.dtype == "fp16":
        return convert_fp16(path, target, data_file)
    return {}


def _move_into(out: Path, chosen: Path, model_file: str, data_file: str | None) -> str | None:
    """Replace out/model_file (and its data file) by the graph at `chosen`."""
    if chosen == out / model_file:
        return data_file
    data_name = data_file or f"{model_file}.data"
    for stale in (out / model_file, out / data_name):
        stale.unlink(missing_ok=True)
    shutil.move(str(chosen), out / model_file)
    if (chosen.parent / data_name).exists():
        shutil.move(str(chosen.parent / data_name), out / data_name)
        return data_name
    return None


def convert(config: Any, reference: Any, out: Path, manifest: Manifest, options: Options, step: Progress) -> None:
    """fp32 artifact graph in `out` -> the final graph in `out`, with manifest.quality filled in.
    `reference` holds the fp32 PyTorch logits on held-out text (computed before the PyTorch
    model was freed); `config` is the checkpoint's config. On a failed quality gate nothing of
    the artifact is left in `out`."""
    options.check()
    name = options.name
    model_file, data_file = manifest.model_file, manifest.external_data
    plain = out / model_file
    # fp16 targets CUDA, which this machine may lack: fuse only when asked, never by CPU timing.
    try_fusions = options.optimize is True or (options.optimize is None and options.dtype != "fp16")
    report: dict[str, Any] = {"precision": name}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        graphs = {"plain": plain}
        optimization: dict[str, Any] = {}
        if try_fusions:
            step("running the ONNX Runtime transformer optimizer")
            variants = {"fused": True} | ({"fused-no-attention": False} if options.quantize else {})
            for variant, attention in variants.items():
                target = Path(tmp) / variant / model_file
                target.parent.mkdir()
                try:
                    optimization[variant] = optimizer.optimize_graph(plain, target, manifest, config, attention)
                    if not attention and "Attention" not in optimization.get("fused", {}).get("fusions", {}):
                        optimization.pop(variant)  # the same graph as "fused": nothing to time
                        continue
                    graphs[variant] = target
                except Exception as exc:  # the optimizer is third-party code: record, don't fail the export
                    optimization[variant] = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
        finals: dict[str, Path] = {}
        for variant, path in graphs.items():
            if not (options.quantize or options.dtype != "fp32"):
                finals[variant] = path
                continue
            target = Path(tmp) / f"{variant}-{name}" / model_file
            target.parent.mkdir()
            step(f"converting the {variant} graph to {name}")
            report["conversion"] = _convert_one(path, target, manifest, options, data_file)
            finals[variant] = target
        chosen = "plain"
        if len(finals) > 1 and options.dtype != "fp16":
            step(f"timing {', '.join(finals)} interleaved")
            decision = optimizer.choose_fastest(finals, manifest)
            chosen = decision.chosen
            if options.optimize is True and chosen == "plain":  # explicit: the fastest fused graph
                chosen = min((n for n in finals if n != "plain"), key=lambda n: decision.ms[n])
            optimization["decision"] = decision.as_dict() | {"chosen": chosen}
            step(f"graphs (ms): {', '.join(f'{k} {v:.2f}' for k, v in decision.ms.items())} -> {chosen}")
        elif options.optimize is True and len(finals) > 1:
            chosen = next(n for n in finals if n != "plain")
        if optimization:
            optimization |= {"applied": chosen != "plain", "chosen": chosen,
                             "nodes_before": node_counts(finals["plain"]),
                             "nodes_after": node_counts(finals[chosen])}
            report["optimization"] = optimization
        manifest.external_data = _move_into(out, finals[chosen], model_file, data_file)
    manifest.inputs, manifest.outputs = io_dtypes(out / model_file)
    manifest.dtype = options.dtype
    manifest.quantization = options.quantize
    # fp32/fp16 graphs have no activation quantization; int8/int4 say what their kernels are.
    manifest.batch_invariant = bool(report.get("conversion", {}).get("batch_invariant", True))
    step(f"checking {name} quality against PyTorch on held-out text")
    report |= quality.quality_report(out, manifest, reference)
    step(quality.describe(report))
    try:
        quality.gate(report, name, options.force)
    except JaonnxError:
        for stale in (out / model_file, out / f"{model_file}.data", out / "jaonnx.json"):
            stale.unlink(missing_ok=True)
        raise
    manifest.quality = report
