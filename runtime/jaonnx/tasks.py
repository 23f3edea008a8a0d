"""The task registry: which runtime class opens an artifact of each task.

Entries are import paths, so opening a fill-mask artifact never imports the generation
package (and vice versa); `load()`, the manifest check and the CLI all read this one table.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import JaonnxError

TASKS: dict[str, str] = {
    "fill-mask": "jaonnx.fill_mask:FillMask",
    "text-generation": "jaonnx.generation:TextGenerator",
}


def task_class(task: str) -> Any:
    """The class registered for `task`."""
    if task not in TASKS:
        raise JaonnxError(f"artifact task {task!r} is not supported by this jaonnx: upgrade it")
    module, name = TASKS[task].split(":")
    return getattr(import_module(module), name)
