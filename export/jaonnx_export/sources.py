"""Where a checkpoint comes from: a local directory or a hub id, and which recipe it needs.

A hub id resolves through the Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE` are honoured
by huggingface_hub itself) and downloads only what an export reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaonnx.errors import JaonnxError
from jaonnx.recipes import Recipe, detect_recipe, get_recipe, recipe_for_hub_id

# Config, tokenizer and generation JSON, sentencepiece models and safetensors weights; never
# the TF/Flax/ONNX/msgpack copies many repositories also carry.
ALLOW_PATTERNS = ["*.json", "*.model", "*.safetensors"]
# Older repositories have only PyTorch pickles: fetched when no safetensors came down.
FALLBACK_PATTERNS = ["pytorch_model*.bin"]


@dataclass(frozen=True)
class Source:
    directory: Path
    recipe: Recipe
    name: str  # what the user passed, recorded in the manifest


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict ({} when absent); a corrupt one is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JaonnxError(f"{path} is not valid JSON ({exc.__class__.__name__}): fix or re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise JaonnxError(f"{path} is not a JSON object: fix or re-download the checkpoint")
    return data


def hub_error(hub_id: str, exc: BaseException) -> JaonnxError:
    """One line per kind of hub failure: gated/unauthorized, not found, offline/unreachable."""
    from huggingface_hub import errors

    local = "or download it elsewhere and pass the local directory"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.GatedRepoError):
        return JaonnxError(
            f"{hub_id} is gated: accept its terms on huggingface.co and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)) and status != 401:
        return JaonnxError(f"{hub_id} was not found on the Hugging Face hub: check the id (a private repo needs HF_TOKEN)")
    if status in (401, 403) or isinstance(exc, errors.RepositoryNotFoundError):
        return JaonnxError(
            f"the hub refused access to {hub_id} (HTTP {status or 401}): set HF_TOKEN to a token that may read it"
        )
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)) or (
        exc.__class__.__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3")
    ):
        return JaonnxError(
            f"cannot download {hub_id}: offline or the Hugging Face hub is unreachable, and it is not in the "
            f"local cache (HF_HOME); connect (unset HF_HUB_OFFLINE), {local}"
        )
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
    return JaonnxError(f"cannot download {hub_id} from the Hugging Face hub ({first}): {local}")


def _download(hub_id: str) -> Path:
    """The snapshot directory in the HF cache, downloading only `ALLOW_PATTERNS` when needed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise JaonnxError("hub ids need huggingface_hub: pip install 'jaonnx[cpu,export]'") from None
    try:
        directory = Path(snapshot_download(hub_id, allow_patterns=ALLOW_PATTERNS))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(hub_id, allow_patterns=FALLBACK_PATTERNS))
    except Exception as exc:  # classified into one line each; never a traceback
        raise hub_error(hub_id, exc) from None
    return directory


def resolve(src: str, recipe_id: str | None = None) -> Source:
    """A local directory (recipe from --recipe or detected) or a hub id (recipe by id)."""
    path = Path(src).expanduser()
    if path.is_dir():
        config = read_json(path / "config.json")
        if not config:
            raise JaonnxError(f"{path} has no config.json: pass a transformers checkpoint directory")
        if recipe_id:
            recipe = get_recipe(recipe_id)
        else:
            architecture = (config.get("architectures") or [None])[0]
            tokenizer_class = read_json(path / "tokenizer_config.json").get("tokenizer_class")
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


def generation_config(source: Source) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} when absent)."""
    return read_json(source.directory / "generation_config.json")
