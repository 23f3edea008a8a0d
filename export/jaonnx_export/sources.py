"""Where a checkpoint comes from: a local directory or a hub id, and which recipe it needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jaonnx.errors import JaonnxError
from jaonnx.recipes import Recipe, detect_recipe, get_recipe, recipe_for_hub_id


@dataclass(frozen=True)
class Source:
    directory: Path
    recipe: Recipe
    name: str  # what the user passed, recorded in the manifest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise JaonnxError(f"{path} is not valid JSON ({exc.msg}): fix or re-download the checkpoint") from None


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id))
    except Exception as exc:  # offline, unknown repo, auth: all mean "could not fetch"
        raise JaonnxError(
            f"cannot download {hub_id} from the Hugging Face hub ({exc.__class__.__name__}): "
            "check the network, or download it elsewhere and pass the local directory"
        ) from None


def resolve(src: str, recipe_id: str | None = None) -> Source:
    """A local directory (recipe from --recipe or detected) or a hub id (recipe by id)."""
    path = Path(src).expanduser()
    if path.is_dir():
        config = _read_json(path / "config.json")
        if not config:
            raise JaonnxError(f"{path} has no config.json: pass a transformers checkpoint directory")
        if recipe_id:
            recipe = get_recipe(recipe_id)
        else:
            architecture = (config.get("architectures") or [None])[0]
            tokenizer_class = _read_json(path / "tokenizer_config.json").get("tokenizer_class")
            recipe = detect_recipe(architecture, tokenizer_class)
        return Source(path, recipe, str(src))
    if path.exists():
        raise JaonnxError(f"{path} is a file: pass a checkpoint directory or a hub id")
    recipe = get_recipe(recipe_id) if recipe_id else recipe_for_hub_id(src)
    if recipe is None:
        if "/" not in src:
            raise JaonnxError(f"{src} is neither a directory nor a hub id: check the path")
        raise JaonnxError(f"no recipe for hub id {src}: pass --recipe (see `jaonnx recipes`)")
    return Source(_download(src), recipe, src)
