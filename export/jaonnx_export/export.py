"""Source checkpoint -> self-contained artifact directory (model.onnx, tokenizer, jaonnx.json)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.recipes import Recipe
from jaonnx.tokenization import RecipeTokenizer

from . import decoder_graph
from .architectures import ARCHITECTURES
from .genai import write_genai_files
from .sources import Source, resolve

ExternalData = Literal["auto", "always", "never"]
OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# protobuf cannot hold more than 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

DEFAULT_KV_CACHE = "static"

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


def _load_model(source: Source) -> Any:
    import torch
    import transformers

    model_class = getattr(transformers, source.recipe.architecture)
    try:
        model = model_class.from_pretrained(source.directory, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise JaonnxError(f"cannot load {source.name} as {model_class.__name__}: {first}") from None
    return model.eval()


def _write_tokenizer(source: Source, out: Path) -> None:
    """Copy the sentencepiece model, or have transformers write its exact tokenizer.json."""
    recipe = source.recipe
    target = out / recipe.tokenizer_file
    if recipe.tokenizer_backend == "sentencepiece":
        found = source.directory / recipe.tokenizer_file
        if not found.is_file():
            raise JaonnxError(f"{source.name} has no {recipe.tokenizer_file}, which recipe {recipe.id} reads")
        shutil.copyfile(found, target)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    tokenizer.backend_tokenizer.save(str(target))


def _special_ids(recipe: Recipe, out: Path) -> tuple[dict[str, int], int]:
    from jaonnx.tokenization import load_backend

    backend = load_backend(recipe.tokenizer_backend, out / recipe.tokenizer_file)
    ids = {}
    for role, token in recipe.special.items():
        token_id = backend.piece_to_id(token)
        if token_id is None:
            raise JaonnxError(f"the tokenizer has no {token!r} ({role}), which recipe {recipe.id} needs")
        ids[role] = token_id
    return ids, backend.vocab_size


def _save_onnx(traced: Path, out: Path, external_data: ExternalData) -> str | None:
    """Re-save the traced graph as model.onnx, with all weights in one relative data file
    when it is large or when asked (the legacy exporter would scatter hundreds of files)."""
    import onnx

    model = onnx.load(str(traced), load_external_data=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    use_external = external_data == "always" or (external_data == "auto" and size > EXTERNAL_DATA_THRESHOLD)
    for stale in (out / MODEL_FILE, out / DATA_FILE):
        stale.unlink(missing_ok=True)
    if use_external:
        onnx.save_model(
            model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
            location=DATA_FILE, size_threshold=1024,
        )
        return DATA_FILE
    onnx.save_model(model, str(out / MODEL_FILE))
    return None


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
) -> Manifest:
    """Export `src` (hub id or directory) to the artifact directory `out` and check parity.

    `quantize="int8"`/`"int4"` (CPU) or `dtype="fp16"` (CUDA) convert the checked fp32 graph and
    gate it on a quality report against PyTorch (see precision.py); `optimize=None` keeps ORT's
    offline transformer fusions only where they measure faster, True/False force them on/off;
    `force` keeps an artifact that fails the quality gate. `kv_cache` picks a decoder's cache
    layout ("concat" or "static", see decoder_graph.py; None: the default)."""
    import torch

    from . import precision
    from .parity import check_parity

    step = progress or (lambda _msg: None)
    options = precision.Options(quantize, dtype, optimize, force, int4_block or precision.rewrite.INT4_BLOCK, lm_head)
    options.check()
    source = resolve(src, recipe_id)
    recipe = source.recipe
    adapter = ARCHITECTURES.get(recipe.architecture)
    if adapter is None:
        raise JaonnxError(f"no exporter for {recipe.architecture}: add one to jaonnx_export.architectures")
    static = _static_kv(kv_cache, adapter.task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    step(f"loading {source.name} ({recipe.architecture}, recipe {recipe.id})")
    model = _load_model(source)
    config = model.config
    _write_tokenizer(source, out)
    special_ids, vocab_size = _special_ids(recipe, out)

    reason = decoder_graph.supported(config) if static else None
    if reason and kv_cache == "static":
        raise JaonnxError(f"{reason}: export with --kv-cache concat")
    if reason:
        step(f"{reason}: using the concat KV cache")
        static = False
    if quantize and not static:
        _untie_lm_head(model)
    inputs, outputs = adapter.names(config)
    input_types = {name: ("float32" if name.startswith("past") else "int64") for name in inputs}
    decoder_shape = adapter.decoder_shape(config)
    if static:
        input_types, output_types = decoder_graph.names(decoder_shape.num_layers)
        inputs, outputs, decoder_shape = list(input_types), list(output_types), decoder_graph.decoder_shape(config)
        optimize = options.optimize = False  # built from fused ops; timing feeds are concat-style (see notes)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        traced = Path(tmp) / MODEL_FILE
        if static:
            step("building the static-KV-cache decoder graph")
            decoder_graph.build(model, traced)
        else:
            step("tracing the ONNX graph")
            with torch.no_grad():
                torch.onnx.export(
                    adapter.wrap(model, recipe), adapter.example_inputs(config), str(traced), input_names=inputs,
                    output_names=outputs, dynamic_axes=adapter.dynamic_axes(config),
                    opset_version=OPSET, dynamo=False,
                )
        step("saving model.onnx")
        data_file = _save_onnx(traced, out, external_data)

    manifest = Manifest(
        recipe=recipe.id,
        task=adapter.task,
        model_file=MODEL_FILE,
        tokenizer_file=recipe.tokenizer_file,
        special_ids=special_ids,
        vocab_size=int(config.vocab_size),
        max_positions=adapter.max_positions(config),
        inputs=input_types,
        outputs={name: "float32" for name in outputs},
        opset=OPSET,
        source=source.name,
        external_data=data_file,
        decoder=decoder_shape,
        versions=_versions(),
    )
    step("checking parity against PyTorch")
    tokenizer = RecipeTokenizer.from_file(recipe, out / recipe.tokenizer_file, special_ids)
    manifest.parity = check_parity(model, out, manifest, tokenizer, parity_texts)
    if quantize or dtype != "fp32" or optimize is not False:
        from .twins import heldout_lines

        precision.convert(model, out, manifest, tokenizer, options, step, heldout_lines())
    if write_genai_files(out, manifest, config):
        step("wrote genai_config.json (onnxruntime-genai runs this artifact too)")
    manifest.write(out)
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
