"""The running batch: a decoder graph plus the KV cache of every active row.

The generation engine talks to the model only through this protocol, so a new cache layout
(a preallocated, in-place buffer; a GPU-resident batch) is one new class, not a new loop.
Rows are numbered 0..rows-1 in the order they joined; `keep` renumbers them.

A prompt joins in one of two ways: `add` prefills whole prompts in one forward, or `open` /
`fill` / `join` prefill one prompt chunk by chunk outside the running batch (the engine's
chunked prefill, interleaved with the running rows' `step`s), starting from cached prefix KV
when there is some. Every logits array a BatchDecoder returns has the ids past the tokenizer
masked to -inf (`graph_io.GraphIO.logits`), so no caller has to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class JoiningRow:
    """One prompt being prefilled outside the running batch; its cache is the layout's own."""

    length: int  # positions held
    reserve: int  # the most positions the row will reach once running (prompt + generated)
    cache: Any  # concat: its one-row OrtValues; static: None (it lives in the batch's buffer)


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

    def open(self, reserve: int, prefix: Sequence[np.ndarray] = ()) -> JoiningRow:
        """A new joining row, empty or holding `prefix`: cached KV, consecutive host arrays
        [past names, heads, positions, head_dim] (see `read`), written in order from position 0. A layout may hold one joining
        row at a time (static: the slot above the running rows); opening another then drops
        an unjoined earlier one, which is what an aborted prefill needs."""

    def fill(self, row: JoiningRow, tokens: Sequence[int], every: bool = False) -> np.ndarray:
        """Append `tokens` to a joining row; the last position's logits float32 [vocab], or
        with `every` each new position's [len(tokens), vocab] (prompt log-probabilities)."""

    def read(self, row: JoiningRow, start: int, end: int) -> np.ndarray:
        """A host copy of positions start..end-1 of a joining row's cache (for the prefix cache)."""

    def join(self, row: JoiningRow, copies: int = 1) -> None:
        """Append `copies` rows holding the joining row's cache to the running batch."""
