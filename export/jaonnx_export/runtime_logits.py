"""An artifact's logits through the runtime's own classes: the one path by which the parity
check (parity.py) and the quality report (quality.py) read an exported graph.

Both compare against PyTorch, so both must see exactly what a user of `jaonnx.load` gets:
`FillMask` for encoders, the engine's `BatchDecoder` (either KV-cache layout) for decoders.
On CPU and without ORT's optimized-graph cache: these are scratch files about to move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest


class RuntimeLogits:
    """Logits of the artifact graph in `directory`, run as the runtime runs it."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.task = manifest.task
        self.model: Any
        if manifest.task == "fill-mask":
            from jaonnx.fill_mask import FillMask

            self.model = FillMask(directory, manifest, providers="cpu", cache=False)
        else:
            from jaonnx.generation import TextGenerator

            self.model = TextGenerator(directory, manifest, providers="cpu", cache=False)

    def every_position(self, rows: list[list[int]]) -> list[np.ndarray]:
        """Each row's logits [len(row), vocab] at every position: encoders in one right-padded
        batch, decoders one row at a time through a fresh batch's full-sequence pass."""
        if self.task == "fill-mask":
            logits = self.model.logits(rows, every_position=True)
            return [logits[i, : len(row)] for i, row in enumerate(rows)]
        return [self.model.new_batch().logits(row) for row in rows]

    def decode(self, row: list[int], prompt_length: int) -> np.ndarray:
        """Logits [len(row), vocab] of a decoder fed `row` the way generation feeds it: the
        prompt prefilled into the running batch, then each later token one step at a time
        through the KV cache."""
        batch = self.model.new_batch()
        steps = [batch.logits(row[:prompt_length])]
        batch.add([row[:prompt_length]], reserve=len(row))
        for token in row[prompt_length:]:
            steps.append(batch.step(np.array([[token]]))[0])
        return np.concatenate(steps)[: len(row)]
