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

from . import consistency, decoder_graph
from .architectures import ARCHITECTURES, Adapter
from .genai import write_genai_files
from .onnx_files import MODEL_FILE, OPSET, ExternalData, save, trace
from .sources import Source, resolve
from .staging import Staging

Progress = Callable[[str], None]
DEFAULT_KV_CACHE = "static"  # decoders whose shape GroupQueryAttention takes; else concat


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


def _adapter(source: Source) -> Adapter:
    adapter = ARCHITECTURES.get(source.recipe.architecture)
    if adapter is None:
        raise JaonnxError(f"no exporter for {source.recipe.architecture}: add one to jaonnx_export.architectures")
    return adapter


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
    kv_cache: str | None = None,
    parity_atol: float | None = None,
) -> Manifest:
    """Export `src` (hub id or directory) to the artifact directory `out` and check parity.

    `quantize="int8"`/`"int4"` (CPU) or `dtype="fp16"` (CUDA) convert the checked fp32 graph and
    gate it on a quality report against PyTorch (see precision.py); `optimize=None` keeps ORT's
    offline transformer fusions only where they measure faster, True/False force them on/off;
    `force` keeps an artifact that fails the quality gate; `kv_cache` picks a decoder's cache
    layout ("static" or "concat", see decoder_graph.py; None: static where the model allows);
    `parity_atol` overrides the parity tolerance (recorded in the manifest).
    `out` changes only if every check passes."""
    from . import precision
    from .parity import check_parity

    step = progress or (lambda _msg: None)
    options = precision.Options(quantize, dtype, optimize, force, int4_block or precision.rewrite.INT4_BLOCK, lm_head)
    options.check()
    _check_parity_atol(parity_atol)
    source = resolve(src, recipe_id)
    recipe, adapter = source.recipe, _adapter(source)
    static = _static_kv(kv_cache, adapter.task)

    with Staging(Path(out)) as stage:
        work = stage.work
        step(f"loading {source.name} ({recipe.architecture}, recipe {recipe.id})")
        model = _load_model(source)
        config = model.config
        if static and (reason := decoder_graph.supported(config)):
            if kv_cache == "static":
                raise JaonnxError(f"{reason}: export with --kv-cache concat")
            step(f"{reason}: using the concat KV cache")
            static = False
        if static:
            options.optimize = False  # built from fused ops; the fusion timing feeds are concat-style
        convert = bool(quantize or dtype != "fp32" or options.optimize is not False)

        step("checking the tokenizer and special tokens against the checkpoint")
        _write_tokenizer(source, work)
        backend = load_backend(recipe.tokenizer_backend, work / recipe.tokenizer_file)
        checks = consistency.check_vocab(source, int(config.vocab_size), backend.vocab_size)
        special_ids, found = consistency.special_ids(source, recipe, backend, config)
        checks |= found | consistency.generation_report(source, recipe)
        if line := consistency.describe_generation(checks):
            step(line)
        tokenizer = RecipeTokenizer(recipe, backend, special_ids)
        inputs, outputs = adapter.input_dtypes(config), adapter.names(config)[1]
        decoder_shape = adapter.decoder_shape(config)
        if static:
            inputs, static_outputs = decoder_graph.names(decoder_shape.num_layers)
            outputs, decoder_shape = list(static_outputs), decoder_graph.decoder_shape(config)
        manifest = Manifest(
            recipe=recipe.id, task=adapter.task, model_file=MODEL_FILE, tokenizer_file=recipe.tokenizer_file,
            special_ids=special_ids, vocab_size=int(config.vocab_size), max_positions=adapter.max_positions(config),
            inputs=inputs, outputs={name: "float32" for name in outputs}, opset=OPSET, source=source.name,
            decoder=decoder_shape, versions=_versions(), recipe_spec=recipe,
            tokenizer_size=backend.vocab_size, checks=checks,
        )

        step("computing PyTorch reference logits")
        parity_ref = adapter.parity_reference(model, tokenizer, parity_texts)
        quality_ref = _quality_reference(model, manifest, tokenizer) if convert else None

        traced = work / ".traced" / MODEL_FILE
        traced.parent.mkdir()
        if static:
            step("building the static-KV-cache decoder graph")
            decoder_graph.build(model, traced)
        else:
            step("tracing the ONNX graph")
            if quantize:
                _untie_lm_head(model)
            trace(adapter.wrap(model, recipe), adapter, config, traced)
        del model
        gc.collect()  # free the PyTorch weights before ONNX Runtime loads its copy

        step("saving model.onnx")
        manifest.external_data = save(traced, work, external_data)
        shutil.rmtree(traced.parent)

        step("checking parity against PyTorch")
        manifest.parity = check_parity(adapter, work, manifest, parity_ref, parity_atol)
        if convert:
            precision.convert(config, quality_ref, work, manifest, options, step)
        if write_genai_files(work, manifest, config):
            step("wrote genai_config.json (onnxruntime-genai runs this artifact too)")
        manifest.write(work)
        stage.commit()
    return manifest


def _static_kv(kv_cache: str | None, task: str) -> bool:
    """Whether to build the in-place KV-cache graph; only decoders have a cache."""
    if kv_cache not in (None, "concat", "static"):
        raise JaonnxError(f"--kv-cache must be static or concat, not {kv_cache!r}")
    if task != "text-generation":
        if kv_cache is not None:
            raise JaonnxError(f"--kv-cache applies to text-generation models, not {task}: leave it out")
        return False
    return (kv_cache or DEFAULT_KV_CACHE) == "static"


def _untie_lm_head(model: Any) -> None:
    """Give the LM head its own copy of a tied embedding: a head that reads the shared table
    (through a Transpose) is left fp32 by int8 quantization, which halves int8 decode speed."""
    import torch

    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def _quality_reference(model: Any, manifest: Manifest, tokenizer: RecipeTokenizer) -> Any:
    """fp32 PyTorch logits on held-out text for the converted graph's quality report."""
    from . import precision, quality
    from .corpus import heldout_lines

    return quality.reference_logits(model, manifest, tokenizer, heldout_lines()[: precision.QUALITY_TEXTS])
