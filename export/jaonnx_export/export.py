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
    optimize: bool = False,
    force: bool = False,
    kv_cache: str | None = None,
) -> Manifest:
    """Export `src` (hub id or directory) to the artifact directory `out` and check parity.

    `quantize="int8"` (CPU) or `dtype="fp16"` (CUDA) convert the checked fp32 graph and gate it
    on a quality report against PyTorch (see precision.py); `optimize` keeps ORT's offline
    transformer fusions only where they measure faster; `force` keeps an artifact that fails
    the quality gate. `kv_cache` picks a decoder's cache layout ("concat" or "static", see
    decoder_graph.py; None: the default)."""
    import torch

    from .parity import check_parity

    step = progress or (lambda _msg: None)
    if quantize not in (None, "int8"):
        raise JaonnxError(f"--quantize must be int8, not {quantize!r}")
    if dtype not in ("fp32", "fp16"):
        raise JaonnxError(f"--dtype must be fp32 or fp16, not {dtype!r}")
    if quantize and dtype != "fp32":
        raise JaonnxError("--quantize int8 and --dtype fp16 do not combine: int8 is for CPU, fp16 for CUDA")
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
        optimize = False  # the graph is built from fused ops; the session fuses the rest
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
    if quantize or dtype != "fp32" or optimize:
        _convert(model, out, manifest, tokenizer, quantize, dtype, optimize, force, step)
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


def _convert(
    model: Any, out: Path, manifest: Manifest, tokenizer: RecipeTokenizer, quantize: str | None, dtype: str,
    optimize: bool, force: bool, step: Progress,
) -> None:
    """fp32 artifact in `out` -> (optimized) int8/fp16 artifact in `out`, with its quality report."""
    from . import precision
    from .twins import heldout_lines

    precision_name = quantize or dtype
    step(f"computing fp32 PyTorch reference logits on held-out text for the {precision_name} quality report")
    reference = precision.reference_logits(model, manifest, tokenizer, heldout_lines()[: precision.QUALITY_TEXTS])
    data_file = manifest.external_data
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        candidates = {"plain": out / MODEL_FILE}
        optimization: dict[str, Any] = {}
        if optimize:
            step("running the ONNX Runtime transformer optimizer")
            target = Path(tmp) / "optimized" / MODEL_FILE
            target.parent.mkdir()
            try:
                optimization = precision.optimize_graph(out / MODEL_FILE, target, manifest, model.config)
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
    try:
        precision.gate(report, precision_name, force)
    except JaonnxError:
        for stale in (out / MODEL_FILE, out / DATA_FILE, out / "jaonnx.json"):
            stale.unlink(missing_ok=True)
        raise
    manifest.quality = report
