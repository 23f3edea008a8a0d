"""The server's one warning for artifacts whose batched tokens may differ from solo ones.

Artifacts exported before per-row activation quantization (int8, and int4's int8 LM head)
took one activation scale per batch, so a request's greedy tokens could depend on its batch
neighbours. They still run; the server says so once, the first time it batches one."""

from __future__ import annotations

import logging

from ..artifact import Manifest

LOGGER = logging.getLogger("jaonnx.serving")


def not_invariant_warning(name: str, manifest: Manifest) -> str | None:
    """The one-line warning for model `name`, or None when its artifact is batch-invariant."""
    if manifest.is_batch_invariant:
        return None
    precision = manifest.quantization or manifest.dtype
    return (f"model {name!r} ({precision}) is not batch-invariant: a request's tokens may depend on the other "
            f"requests batched with it; re-export it with this jaonnx version (per-row quantization) to fix that")


class InvarianceWarning:
    """Warns once per worker, at the first step that decodes more than one row."""

    def __init__(self, name: str, manifest: Manifest) -> None:
        self.message = not_invariant_warning(name, manifest)

    def batched(self, rows: int) -> None:
        if self.message is not None and rows > 1:
            LOGGER.warning(self.message)
            self.message = None
