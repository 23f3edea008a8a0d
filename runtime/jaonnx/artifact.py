"""The artifact directory: the contract between export and runtime.

An artifact is `model.onnx` (+ at most one external-data file), the tokenizer file and
`jaonnx.json`, the manifest written here and validated on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import JaonnxError
from .recipes import Recipe, get_recipe
from .tasks import TASKS
from .typecheck import FieldError, build

MANIFEST_NAME = "jaonnx.json"
KV_LAYOUTS = ("concat", "static")  # decoder.kv_layout: how the graph holds its KV cache
# 2: the resolved recipe is recorded (`recipe_spec`), plus `tokenizer_size` and `checks`.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# Sizes past these are corruption, not a model: 4x the largest vocabularies and contexts in
# use, so a manifest value that loads cannot make the runtime allocate absurd buffers.
SIZE_LIMITS = {"vocab_size": 2**20, "tokenizer_size": 2**20, "max_positions": 2**21}


@dataclass
class DecoderShape:
    """What the runtime needs to build an empty KV cache."""

    num_layers: int
    num_heads: int
    head_dim: int
    # "concat": past_key_values.* in, a longer present.* out every step (the traced graph).
    # "static": GroupQueryAttention over a preallocated buffer written in place
    # (generation/static_cache.py drives it).
    kv_layout: str = "concat"


@dataclass
class Manifest:
    recipe: str
    task: str
    model_file: str
    tokenizer_file: str
    special_ids: dict[str, int]
    vocab_size: int
    max_positions: int
    inputs: dict[str, str]  # name -> dtype
    outputs: dict[str, str]
    dtype: str = "fp32"
    quantization: str | None = None
    opset: int | None = None
    source: str = ""
    external_data: str | None = None
    decoder: DecoderShape | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # Format 2. The recipe as it was when exported: the runtime reads tokenization layout,
    # normalizers, special tokens and generation defaults from here, so a later edit of
    # recipes.py cannot change an artifact that already exists. Absent in format 1.
    recipe_spec: Recipe | None = None
    tokenizer_size: int | None = None  # ids the tokenizer can decode; logits past it are masked
    checks: dict[str, Any] = field(default_factory=dict)  # export-time consistency findings
    # Whether each row's numbers are independent of the other rows of a batch (activations
    # quantized per row, never per tensor): greedy tokens are then the same alone and batched.
    # None: exported before the field existed (see is_batch_invariant).
    batch_invariant: bool | None = None
    # True: ONNX Runtime's CPU graph passes left this graph unchanged when it was exported
    # (jaonnx_export/ort_fixed_point.py), so the runtime loads it as it is and writes no
    # optimized copy into its cache (ort_cache.py). None: not checked (older artifacts).
    ort_fixed_point: bool | None = None
    # [offset, length] ranges of the data file that ORT reads only while loading (MatMulNBits'
    # scales and zero points, packed into its own buffers on x86-64; jaonnx_export/load_only.py):
    # the runtime drops their pages once the session is built (page_release.py).
    load_only_data: tuple[tuple[int, ...], ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def recipe_obj(self) -> Recipe:
        """The recipe recorded in the artifact (format 2), or the registry's one (format 1)."""
        return self.recipe_spec if self.recipe_spec is not None else get_recipe(self.recipe)

    @property
    def is_batch_invariant(self) -> bool:
        """The recorded answer; for artifacts older than the field, unquantized graphs are and
        quantized ones are not (their int8 layers, and int4's LM head, took one activation
        scale per batch: DynamicQuantizeMatMul)."""
        if self.batch_invariant is not None:
            return self.batch_invariant
        return self.quantization is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """A manifest from JSON data, every field type-checked (FieldError names the field)."""
        if not isinstance(data, dict):
            raise FieldError(f"the manifest must be a JSON object, not {type(data).__name__}")
        manifest = build(cls, data, "manifest")
        if any(len(r) != 2 or min(r) < 0 for r in manifest.load_only_data):
            raise FieldError("manifest.load_only_data must list [offset, length] pairs of non-negative byte counts")
        for name in (manifest.model_file, manifest.tokenizer_file, manifest.external_data):
            if name is not None and (not name or Path(name).name != name or name in (".", "..")):
                raise FieldError(f"manifest file name {name!r} must be a plain file inside the artifact")
        if manifest.task == "text-generation" and manifest.decoder is None:
            raise FieldError("manifest.decoder is missing for a text-generation artifact")
        sizes = {"vocab_size": manifest.vocab_size, "max_positions": manifest.max_positions,
                 "tokenizer_size": manifest.tokenizer_size or 1,
                 **({f"decoder.{k}": v for k, v in asdict(manifest.decoder).items() if k != "kv_layout"}
                    if manifest.decoder else {})}
        bad = [name for name, value in sizes.items() if value < 1]
        if bad:
            raise FieldError(f"manifest.{bad[0]} must be positive")
        absurd = [name for name, value in sizes.items() if value > SIZE_LIMITS.get(name.split(".")[-1], 2**16)]
        if absurd:
            raise FieldError(f"manifest.{absurd[0]} is {sizes[absurd[0]]}, past any model this reads")
        if manifest.decoder is not None and manifest.decoder.kv_layout not in KV_LAYOUTS:
            raise FieldError(f"manifest.decoder.kv_layout must be one of {', '.join(KV_LAYOUTS)}, "
                             f"not {manifest.decoder.kv_layout!r}: upgrade jaonnx or re-export")
        if manifest.tokenizer_size is not None and manifest.tokenizer_size > manifest.vocab_size:
            raise FieldError("manifest.tokenizer_size is larger than manifest.vocab_size")
        if manifest.recipe_spec is not None and (manifest.recipe_spec.id, manifest.recipe_spec.task) != (
            manifest.recipe, manifest.task
        ):
            raise FieldError("manifest.recipe_spec does not match manifest.recipe and manifest.task")
        return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate an artifact directory; every failure is a one-line JaonnxError."""
    directory = Path(directory)
    if not directory.exists():
        raise JaonnxError(
            f"artifact directory {directory} does not exist: create one with `jaonnx export SRC -o {directory}`"
        )
    if not directory.is_dir():
        raise JaonnxError(f"{directory} is not a directory: pass the directory `jaonnx export` wrote")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise JaonnxError(
            f"{directory} has no {MANIFEST_NAME}, so it is not a jaonnx artifact: re-run `jaonnx export`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise JaonnxError(f"{path} is corrupt ({exc.__class__.__name__}): re-run `jaonnx export`") from None
    except OSError as exc:
        raise JaonnxError(f"cannot read {path} ({exc.strerror}): check its permissions") from None
    version = data.get("format_version", 1) if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise JaonnxError(f"{path} has format {version}, newer than this jaonnx reads: upgrade jaonnx")
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, str) and task not in TASKS:
        raise JaonnxError(f"artifact task {task!r} is not supported by this jaonnx: upgrade it")
    try:
        manifest = Manifest.from_dict(data)
    except FieldError as exc:
        raise JaonnxError(f"{path} is corrupt ({exc}): re-run `jaonnx export`") from None
    if manifest.format_version not in READABLE_FORMATS:
        raise JaonnxError(f"{path} has format {manifest.format_version}, which no jaonnx wrote: re-run `jaonnx export`")
    manifest.recipe_obj  # format 1 with an unknown recipe -> JaonnxError
    needed = [manifest.model_file, manifest.tokenizer_file]
    if manifest.external_data:
        needed.append(manifest.external_data)
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise JaonnxError(
            f"artifact {directory} is incomplete (missing {', '.join(missing)}): re-run `jaonnx export`"
        )
    return manifest
