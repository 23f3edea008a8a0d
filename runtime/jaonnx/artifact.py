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

MANIFEST_NAME = "jaonnx.json"
FORMAT_VERSION = 1


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
    format_version: int = FORMAT_VERSION

    @property
    def recipe_obj(self) -> Recipe:
        return get_recipe(self.recipe)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        if data.get("decoder"):
            data["decoder"] = DecoderShape(**data["decoder"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise JaonnxError(f"{path} is corrupt ({exc.__class__.__name__}): re-run `jaonnx export`") from None
    if manifest.format_version > FORMAT_VERSION:
        raise JaonnxError(
            f"{path} has format {manifest.format_version}, newer than this jaonnx reads: upgrade jaonnx"
        )
    manifest.recipe_obj  # unknown recipe -> JaonnxError
    needed = [manifest.model_file, manifest.tokenizer_file]
    if manifest.external_data:
        needed.append(manifest.external_data)
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise JaonnxError(
            f"artifact {directory} is incomplete (missing {', '.join(missing)}): re-run `jaonnx export`"
        )
    return manifest
