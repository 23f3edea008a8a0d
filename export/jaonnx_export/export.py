"""Source checkpoint -> self-contained artifact directory (model.onnx, tokenizer, jaonnx.json).

`export()` reads as its steps. Memory: every PyTorch reference output is computed first,
then the graph is traced, then the PyTorch model is freed before any ONNX Runtime session
or conversion opens the graph, so the weights are never held twice by the two frameworks.
Atomicity: everything is built in a scratch directory and swapped in after all checks pass.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.tokenization import RecipeTokenizer, load_backend

from . import consistency
from .architectures import ARCHITECTURES, Adapter
from .onnx_files import MODEL_FILE, OPSET, ExternalData, save, trace
from .sources import Source, resolve
from .staging import Staging

Progress = Callable[[str], None]


def _versions() -> dict[str, str]:
    names = ["jaonnx", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _check_options(quantize: str | None, dtype: str, parity_atol: float | None) -> None:
    if quantize not in (None, "int8"):
        raise JaonnxError(f"--quantize must be int8, not {quantize!r}")
    if dtype not in ("fp32", "fp16"):
        raise JaonnxError(f"--dtype must be fp32 or fp16, not {dtype!r}")
    if quantize and dtype != "fp32":
        raise JaonnxError("--quantize int8 and --dtype fp16 do not combine: int8 is for CPU, fp16 for CUDA")
    if parity_atol is not None and not parity_atol > 0:
        raise JaonnxError(f"--parity-atol must be a positive number, not {parity_atol!r}")


def _adapter(source: Source) -> Adapter:
    adapter = ARCHITECTURES.get(source.recipe.architecture)
    if adapter is None:
        raise JaonnxError(f"no exporter for {source.recipe.architecture}: add one to jaonnx_export.architectures")
    return adapter


def _load_model(source: Source) -> Any:
    import torch
    import transformers

    model_class = getattr(transformers, source.recipe.architecture)
    try:
        model = model_class.from_pretrained(source.directory, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise JaonnxError(f"cannot load {source.name} as {model_class.__name__}: {first}") from None
    return model.eval()


def _write_tokenizer(source: Source, work: Path) -> None:
    """Copy the sentencepiece model, or have transformers write its exact tokenizer.json."""
    recipe = source.recipe
    target = work / recipe.tokenizer_file
    if recipe.tokenizer_backend == "sentencepiece":
        found = source.directory / recipe.tokenizer_file
        if not found.is_file():
            raise JaonnxError(f"{source.name} has no {recipe.tokenizer_file}, which recipe {recipe.id} reads")
        shutil.copyfile(found, target)
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
    except (OSError, ValueError) as exc:
        raise JaonnxError(f"cannot load the tokenizer of {source.name}: {str(exc).strip()[:200]}") from None
    tokenizer.backend_tokenizer.save(str(target))


def export(
    src: str,
    out: str | Path,
    recipe_id: str | None = None,
    external_data: ExternalData = "auto",
    progress: Progress | None = None,
    parity_texts: list[str] | None = None,
    *,
    quantize: str | None = None,
    dtype: str = "fp32",
    optimize: bool = False,
    force: bool = False,
    parity_atol: float | None = None,
) -> Manifest:
    """Export `src` (hub id or directory) to the artifact directory `out` and check parity.

    `quantize="int8"` (CPU) or `dtype="fp16"` (CUDA) convert the checked fp32 graph and gate it
    on a quality report against PyTorch (see precision.py); `optimize` keeps ORT's offline
    transformer fusions only where they measure faster; `force` keeps an artifact that fails
    the quality gate; `parity_atol` overrides the parity tolerance (recorded in the manifest).
    `out` changes only if every check passes."""
    from .parity import check_parity

    step = progress or (lambda _msg: None)
    _check_options(quantize, dtype, parity_atol)
    source = resolve(src, recipe_id)
    recipe, adapter = source.recipe, _adapter(source)
    convert = bool(quantize or dtype != "fp32" or optimize)

    with Staging(Path(out)) as stage:
        work = stage.work
        step(f"loading {source.name} ({recipe.architecture}, recipe {recipe.id})")
        model = _load_model(source)
        config = model.config

        step("checking the tokenizer and special tokens against the checkpoint")
        _write_tokenizer(source, work)
        backend = load_backend(recipe.tokenizer_backend, work / recipe.tokenizer_file)
        checks = consistency.check_vocab(source, int(config.vocab_size), backend.vocab_size)
        special_ids, found = consistency.special_ids(source, recipe, backend, config)
        checks |= found | consistency.generation_report(source, recipe)
        if line := consistency.describe_generation(checks):
            step(line)
        tokenizer = RecipeTokenizer(recipe, backend, special_ids)
        outputs = adapter.names(config)[1]
        manifest = Manifest(
            recipe=recipe.id, task=adapter.task, model_file=MODEL_FILE, tokenizer_file=recipe.tokenizer_file,
            special_ids=special_ids, vocab_size=int(config.vocab_size), max_positions=adapter.max_positions(config),
            inputs=adapter.input_dtypes(config), outputs={name: "float32" for name in outputs}, opset=OPSET, source=source.name,
            decoder=adapter.decoder_shape(config), versions=_versions(), recipe_spec=recipe,
            tokenizer_size=backend.vocab_size, checks=checks,
        )

        step("computing PyTorch reference logits")
        parity_ref = adapter.parity_reference(model, tokenizer, parity_texts)
        quality_ref = _quality_reference(model, manifest, tokenizer, quantize, dtype) if convert else None

        step("tracing the ONNX graph")
        if quantize:
            from .conversion import untie_lm_head

            untie_lm_head(model)
        traced = work / ".traced" / MODEL_FILE
        traced.parent.mkdir()
        trace(adapter.wrap(model, recipe), adapter, config, traced)
        del model
        gc.collect()  # free the PyTorch weights before ONNX Runtime loads its copy

        step("saving model.onnx")
        manifest.external_data = save(traced, work, external_data)
        shutil.rmtree(traced.parent)

        step("checking parity against PyTorch")
        manifest.parity = check_parity(adapter, work, manifest, parity_ref, parity_atol)
        if convert:
            from .conversion import convert as convert_graph

            convert_graph(config, quality_ref, work, manifest, quantize, dtype, optimize, force, step)
        manifest.write(work)
        stage.commit()
    return manifest


def _quality_reference(model: Any, manifest: Manifest, tokenizer: RecipeTokenizer, quantize: str | None, dtype: str) -> Any:
    """fp32 PyTorch logits on held-out text for the int8/fp16 quality report."""
    from . import precision
    from .corpus import heldout_lines

    return precision.reference_logits(model, manifest, tokenizer, heldout_lines()[: precision.QUALITY_TEXTS])
