"""jaonnx: fast, torch-free ONNX Runtime inference for Japanese sentencepiece models.

    import jaonnx
    fm = jaonnx.load("artifacts/rinna-roberta")      # FillMask
    fm("4年に1度[MASK]は開かれる。")
    gen = jaonnx.load("artifacts/gpt2-small-ja")     # TextGenerator
    gen.generate("近年の機械学習は", max_new_tokens=20, do_sample=False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import Manifest, read_manifest
from .errors import JaonnxError
from .recipes import RECIPES, Recipe, get_recipe
from .tasks import TASKS, task_class

__version__ = "0.1.0"


def load(path: str | Path, providers: str | list[str] | None = "auto", **session_options: Any) -> Any:
    """Open an artifact directory with the class registered for its task (see `jaonnx.tasks`)."""
    manifest = read_manifest(path)
    return task_class(manifest.task)(Path(path), manifest, providers, **session_options)


__all__ = ["JaonnxError", "Manifest", "RECIPES", "Recipe", "TASKS", "get_recipe", "load", "read_manifest"]
