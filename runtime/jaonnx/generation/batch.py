"""The running batch: a decoder graph plus the KV cache of every active row.

The generation engine talks to the model only through this protocol, so a new cache layout
(a preallocated, in-place buffer; a GPU-resident batch) is one new class, not a new loop.
Rows are numbered 0..rows-1 in the order they joined; `keep` renumbers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class BatchDecoder(Protocol):
    @property
    def rows(self) -> int:
        """Active rows."""

    def add(self, prompts: Sequence[Sequence[int]], reserve: int) -> np.ndarray:
        """Prefill `prompts` as new rows after the existing ones. `reserve` is the most tokens
        (prompt + generated) any of them will reach, for layouts that preallocate.
        Returns their last-position logits, float32 [len(prompts), vocab]."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens int64 [rows, k] to every active row (k > 1 verifies a speculative
        block in one forward). Returns float32 logits [rows, k, vocab]."""

    def discard(self, n: int) -> None:
        """Forget the last `n` positions of every row (rejected speculative tokens)."""

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order; the others' cache is freed."""

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Full-sequence logits float32 [len(ids), vocab] of one text, for scoring; the
        running batch is left as it was."""
