"""A bare decode loop over an artifact's running batch (the engine's `BatchDecoder`, either
KV-cache layout): prefill, then one `step` per token with a numpy argmax. It is the yardstick
for the work `generate` does outside the graph and its IO binding (sampling, bookkeeping,
detokenization): their difference."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifact import read_manifest
from ..errors import JaonnxError


class BareDecoder:
    def __init__(self, directory: str | Path, threads: int | None = None, providers: str = "cpu") -> None:
        from .. import load

        manifest = read_manifest(directory)
        if manifest.task != "text-generation":
            raise JaonnxError(f"{directory} is a {manifest.task} artifact: the bare decode loop needs a decoder")
        self.generator = load(directory, providers=providers, intra_op_threads=threads)
        self.vocab = manifest.tokenizer_size or manifest.vocab_size

    def step_times(self, context: int, steps: int, batch: int = 1, seed: int = 0) -> list[float]:
        """Wall ms of each of `steps` greedy decode steps after a `context`-token prefill."""
        ids = np.random.default_rng(seed).integers(5, max(6, self.vocab), (batch, context), dtype=np.int64)
        running = self.generator.new_batch()
        logits = running.add(ids.tolist(), reserve=context + steps + 2)
        times = []
        for i in range(steps + 1):  # the first step is a warm-up
            begin = time.perf_counter()
            token = logits.argmax(-1).astype(np.int64)
            logits = running.step(token[:, None])[:, -1]
            if i:
                times.append((time.perf_counter() - begin) * 1000)
        return times
