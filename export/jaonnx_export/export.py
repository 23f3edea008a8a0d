"""Source checkpoint -> self-contained artifact directory (model.onnx, tokenizer, jaonnx.json).

`export()` reads as its steps. Memory: every PyTorch reference output is computed first,
then the graph is traced, then the PyTorch model is freed before any ONNX Runtime session
or conversion opens the graph, so the weights are never held twice by the two frameworks.
Atomicity: everything is built in a scratch directory and swapped in after all checks pass.
"""

from __future__ import annotations

import gc
import shutil
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.tokenization import RecipeTokenizer, load_backend

from . import consistency
from .architectures import KV_LAYOUTS, Architecture, adapter_for
from .genai import write_genai_files
from .onnx_files import MODEL_FILE, OPSET, ExternalData, save
from .load_only import load_only_ranges
from .ort_fixed_point import apply_ort_passes, ort_fixed_point
from .sources import Source, resolve
from .staging import Staging

if TYPE_CHECKING:
    from jaonnx.recipes import Recipe

    from .precision import Options

Progress = Callable[[str], None]


class ExportWarning(UserWarning):
    """Something export accepted but a user should know (the Python API's channel; the CLI
    shows the same line as a progress step)."""


def _versions() -> dict[str, str]:
    names = ["jaonnx", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _check_parity_atol(parity_atol: float | None) -> None:
    if parity_atol is not None and not parity_atol > 0:
        raise JaonnxError(f"--parity-atol must be a positive number, not {parity_atol!r}")


def _check_kv_cache(kv_cache: str | None, adapter: Architecture) -> None:
    """Before loading anything: a known layout, asked of a model that has a KV cache."""
    if kv_cache not in (None, *KV_LAYOUTS):
        raise JaonnxError(f"--kv-cache must be static or concat, not {kv_cache!r}")
    if kv_cache is not None and not adapter.kv_layouts:
        raise JaonnxError(f"--kv-cache applies to text-generation models, not {adapter.task}: leave it out")


def _warn(progress: Progress | None, line: str) -> None:
    """One warning line: a progress step when there is a progress display, else a Python warning."""
    if progress is not None:
        progress(f"warning: {line}")
    else:
        warnings.warn(line, ExportWarning, stacklevel=3)


EAGER_ATTENTION_TASKS = frozenset({"fill-mask"})


def _load_model(source: Source) -> Any:
    import torch
    import transformers

    model_class = getattr(transformers, source.recipe.architecture)
    # Encoders trace with eager attention: ORT's Attention fusion does not match the graph that
    # SDPA attention (transformers' default) traces to; with eager, the fused graph is a candidate
    # that precision.convert times against the plain one.
    attention = {"attn_implementation": "eager"} if source.recipe.task in EAGER_ATTENTION_TASKS else {}
    try:
        model = model_class.from_pretrained(source.directory, dtype=torch.float32, **attention)
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
    optimize: bool | None = None,
    force: bool = False,
    int4_block: int | None = None,
    lm_head: str = "int8",
    embedding: str | None = None,
    kv_cache: str | None = None,
    parity_atol: float | None = None,
) -> Manifest:
    """Export `src` (hub id or directory) to the artifact directory `out` and check parity.

    `quantize="int8"`/`"int4"` (CPU) or `dtype="fp16"` (CUDA) convert the checked fp32 graph and
    gate it on a quality report against PyTorch (see precision.py); `optimize=None` keeps ORT's
    offline transformer fusions only where they measure faster, True/False force them on/off;
    `embedding` ("int8"/"int4"/"fp32"; None: int8 for decoders, fp32 for encoders) is the precision
    of an int8/int4 artifact's token embedding table;
    `force` keeps an artifact that fails the quality gate; `kv_cache` picks a decoder's cache
    layout ("static" or "concat", see decoder_graph.py; None: static where the model allows);
    `parity_atol` overrides the parity tolerance (recorded in the manifest).
    `out` changes only if every check passes."""
    from . import precision
    from .parity import check_parity
    from .references import parity_reference

    step = progress or (lambda _msg: None)
    options = precision.Options(quantize, dtype, optimize, force, int4_block or precision.rewrite.INT4_BLOCK, lm_head,
                                embedding)
    options.check()
    _check_parity_atol(parity_atol)
    source = resolve(src, recipe_id)
    recipe, adapter = source.recipe, adapter_for(source.recipe.architecture)
    _check_kv_cache(kv_cache, adapter)

    with Staging(Path(out)) as stage:
        work = stage.work
        step(f"loading {source.name} ({recipe.architecture}, recipe {recipe.id})")
        model = _load_model(source)
        config = model.config
        layout = adapter.kv_layout(config, kv_cache, step)
        graph = adapter.graph_io(config, layout)
        if int4_block is None and quantize == "int4":
            _choose_int4_block(options, recipe, adapter.pads_rows(layout), step)
        if not graph.fusable:
            options.optimize = False
        convert = bool(quantize or dtype != "fp32" or options.optimize is not False)

        step("checking the tokenizer and special tokens against the checkpoint")
        _write_tokenizer(source, work)
        backend = load_backend(recipe.tokenizer_backend, work / recipe.tokenizer_file)
        checks = consistency.check_vocab(source, int(config.vocab_size), backend.vocab_size)
        special_ids, found = consistency.special_ids(source, recipe, backend, config)
        if line := consistency.describe_special(source, found):
            _warn(progress, line)
        checks |= found | consistency.generation_report(source, recipe)
        if line := consistency.describe_generation(checks):
            step(line)
        tokenizer = RecipeTokenizer(recipe, backend, special_ids)
        manifest = Manifest(
            recipe=recipe.id, task=adapter.task, model_file=MODEL_FILE, tokenizer_file=recipe.tokenizer_file,
            special_ids=special_ids, vocab_size=int(config.vocab_size), max_positions=adapter.max_positions(config),
            inputs=graph.inputs, outputs=graph.outputs, opset=OPSET, source=source.name,
            decoder=graph.decoder, versions=_versions(), recipe_spec=recipe,
            tokenizer_size=backend.vocab_size, checks=checks,
            batch_invariant=True,  # fp32; a conversion records its own (precision.convert)
        )

        step("computing PyTorch reference logits")
        parity_ref = parity_reference(adapter.task, model, tokenizer, parity_texts)
        quality_ref = _quality_reference(model, manifest, tokenizer) if convert else None

        traced = work / ".traced" / MODEL_FILE
        traced.parent.mkdir()
        step("building the static-KV-cache decoder graph" if layout == "static" else "tracing the ONNX graph")
        adapter.write_graph(model, recipe, layout, traced, quantized=bool(quantize), cuda=dtype == "fp16",
                            even_rows=options.needs_even_rows)
        del model
        gc.collect()  # free the PyTorch weights before ONNX Runtime loads its copy

        step("saving model.onnx")
        manifest.external_data = save(traced, work, external_data)
        shutil.rmtree(traced.parent)

        step("checking parity against PyTorch")
        manifest.parity = check_parity(work, manifest, parity_ref, parity_atol)
        if convert:
            precision.convert(config, quality_ref, work, manifest, options, step)
        if manifest.dtype != "fp16":  # fp16 is for CUDA: the optimized-graph cache is CPU only
            step("checking whether ONNX Runtime's graph passes change the graph")
            if layout == "static" and apply_ort_passes(work / MODEL_FILE, manifest.external_data):
                step("applied ONNX Runtime's load-time fusions to the graph once, here")
            manifest.ort_fixed_point = ort_fixed_point(work / MODEL_FILE)
            if manifest.external_data:
                manifest.load_only_data = tuple(tuple(r) for r in load_only_ranges(work / MODEL_FILE))
        if write_genai_files(work, manifest, config):
            step("wrote genai_config.json (onnxruntime-genai runs this artifact too)")
        manifest.write(work)
        stage.commit()
    return manifest


def _choose_int4_block(options: Options, recipe: Recipe, pads_rows: bool, step: Progress) -> None:
    """The recipe's int4 block (measured per shape), unless it needs padded rows to stay
    batch-invariant and this graph cannot pad them: then the invariant default."""
    from . import precision

    block = recipe.int4_block
    if block not in precision.INT4_BLOCKS:
        raise JaonnxError(f"recipe {recipe.id}: int4_block must be one of {', '.join(map(str, precision.INT4_BLOCKS))}, "
                          f"not {block}: fix the recipe or pass --int4-block")
    options.int4_block = block
    if options.needs_even_rows and not pads_rows:
        options.int4_block = precision.rewrite.INT4_BLOCK
        step(f"int4 blocks of {options.int4_block}: this graph cannot pad rows, which blocks of {block} need "
             "to stay batch-invariant")


def _quality_reference(model: Any, manifest: Manifest, tokenizer: RecipeTokenizer) -> Any:
    """fp32 PyTorch logits on held-out text for the converted graph's quality report."""
    from . import precision, quality
    from .corpus import heldout_lines

    return quality.reference_logits(model, manifest, tokenizer, heldout_lines()[: precision.QUALITY_TEXTS])
