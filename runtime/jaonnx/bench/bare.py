"""A bare ORT decode loop over an artifact's graph: prefill, then one `run_with_ort_values` per
token with the presents fed back as OrtValues and a numpy argmax. It is the yardstick for the
work `generate` does outside the graph (sampling, bookkeeping, tokenizer): their difference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import read_manifest
from ..errors import JaonnxError
from ..session import create_session, import_ort

_FEEDS = {"input_ids", "attention_mask", "position_ids", "logits_to_keep"}


class BareDecoder:
    def __init__(self, directory: str | Path, threads: int | None = None, providers: str = "cpu") -> None:
        manifest = read_manifest(directory)
        if manifest.task != "text-generation":
            raise JaonnxError(f"{directory} is a {manifest.task} artifact: the bare decode loop needs a decoder")
        self.ort = import_ort()
        self.session = create_session(Path(directory) / manifest.model_file, providers, intra_op_threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past")]
        unknown = sorted(set(inputs) - _FEEDS - set(self.past))
        if unknown or not self.past:
            raise JaonnxError(f"the bare loop does not know the graph inputs {unknown or 'without a past'}")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = inputs
        shape = inputs[self.past[0]].shape
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        self.dtype = np.float16 if "float16" in inputs[self.past[0]].type else np.float32
        self.vocab = manifest.vocab_size

    def _value(self, array: np.ndarray) -> Any:
        return self.ort.OrtValue.ortvalue_from_numpy(array)

    def _run(self, ids: np.ndarray, start: int, past: list[Any]) -> list[Any]:
        b, n = ids.shape
        feeds = {"input_ids": self._value(ids), "attention_mask": self._value(np.ones((b, start + n), np.int64))}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = self._value(np.tile(np.arange(start, start + n, dtype=np.int64), (b, 1)))
        if "logits_to_keep" in self.inputs:
            feeds["logits_to_keep"] = self._value(np.array([1], np.int64))
        feeds.update(zip(self.past, past))
        return self.session.run_with_ort_values(self.outputs, feeds)

    def step_times(self, context: int, steps: int, batch: int = 1, seed: int = 0) -> list[float]:
        """Wall ms of each of `steps` greedy decode steps after a `context`-token prefill."""
        ids = np.random.default_rng(seed).integers(5, max(6, self.vocab), (batch, context), dtype=np.int64)
        empty = self._value(np.zeros((batch, self.heads, 0, self.head_dim), self.dtype))
        out = self._run(ids, 0, [empty] * len(self.past))
        length, times = context, []
        for i in range(steps + 1):  # the first step is a warm-up
            begin = time.perf_counter()
            token = out[0].numpy()[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
            out = self._run(token, length, out[1:])
            length += 1
            if i:
                times.append((time.perf_counter() - begin) * 1000)
        return times
