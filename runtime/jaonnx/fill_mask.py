"""FillMask: transformers' fill-mask pipeline results, from ONNX Runtime, without torch."""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from .errors import JaonnxError
from .model import ArtifactModel
from .numeric import softmax


class Prediction(TypedDict):
    score: float
    token: int
    token_str: str
    sequence: str


class Encoding(TypedDict, total=False):
    input_ids: list[int]
    attention_mask: list[int]
    position_ids: list[int]
    token_type_ids: list[int]
    mask_positions: list[int]


class FillMask(ArtifactModel):
    """`fm("大学で[MASK]の研究をしています")` -> top-k predictions per mask."""

    task = "fill-mask"

    @property
    def mask_token(self) -> str:
        return self.recipe.special.mask or "[MASK]"

    def _ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise JaonnxError(f"expected a text (str), got {type(text).__name__}")
        if not text.strip():
            raise JaonnxError(f"empty text: pass a sentence with at least one {self.mask_token}")
        if self.mask_token not in text:
            raise JaonnxError(f"no {self.mask_token} in {text[:40]!r}: mark the word to predict with {self.mask_token}")
        ids = self.tokenizer.encode_masked(text)
        limit = self.manifest.max_positions
        if len(ids) > limit:
            raise JaonnxError(
                f"text is {len(ids)} tokens but the model takes at most {limit}: shorten it or split it"
            )
        return ids

    def encode(self, text: str) -> Encoding:
        """The exact inputs the model sees (positions are computed in the graph, from 0)."""
        ids = self._ids(text)
        n = len(ids)
        encoding: Encoding = {
            "input_ids": ids,
            "attention_mask": [1] * n,
            "position_ids": [self.recipe.position_start + i for i in range(n)],
        }
        if self.recipe.token_type_ids:
            encoding["token_type_ids"] = [0] * n
        encoding["mask_positions"] = self._mask_positions(ids)
        return encoding

    def _mask_positions(self, ids: list[int]) -> list[int]:
        return [p for p, t in enumerate(ids) if t == self.tokenizer.mask_id]

    def logits(
        self, rows: list[list[int]], positions: list[list[int]] | None = None, *, every_position: bool = False
    ) -> np.ndarray:
        """Right-padded batch -> logits [rows, masks, vocab] at each row's mask positions (rows
        with fewer masks repeat position 0, whose logits are ignored), at `positions`, or at
        every position.

        Logits of ids the tokenizer cannot decode (an embedding table padded past the
        tokenizer) are -inf, so such ids are never predicted."""
        width = max(map(len, rows))
        if every_position:
            masks = [list(range(width))] * len(rows)
        elif positions is not None:
            masks = positions
        else:
            masks = [self._mask_positions(row) for row in rows]
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        positions = np.zeros((len(rows), max(map(len, masks))), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention[i, : len(row)] = 1
            positions[i, : len(masks[i])] = masks[i]
        feed = {"input_ids": input_ids, "attention_mask": attention, "mask_positions": positions}
        (logits,) = self.session.run(["logits"], feed)
        if logits.shape[-1] > self.tokenizer.vocab_size:
            logits[..., self.tokenizer.vocab_size :] = -np.inf
        return logits

    def _predictions(self, ids: list[int], position: int, logits: np.ndarray, top_k: int) -> list[Prediction]:
        probs = softmax(logits)
        top = np.argpartition(-probs, min(top_k, len(probs) - 1))[:top_k]
        top = top[np.argsort(-probs[top], kind="stable")]
        mask_id = self.tokenizer.mask_id
        results: list[Prediction] = []
        for token in top.tolist():
            filled = list(ids)
            filled[position] = token
            results.append(
                {
                    "score": float(probs[token]),
                    "token": int(token),
                    "token_str": self.tokenizer.token_str(token),
                    "sequence": self.tokenizer.decode(filled, keep=(mask_id,)),
                }
            )
        return results

    def __call__(
        self, inputs: str | list[str], top_k: int = 5, batch_size: int = 16
    ) -> list[Prediction] | list[list[Prediction]] | list[Any]:
        """Like transformers' pipeline: one text with one mask gives a list of predictions;
        several masks give a list per mask; a list of texts gives a list per text."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise JaonnxError(f"top_k must be a positive integer, got {top_k!r}")
        single = isinstance(inputs, str)
        if not single and not isinstance(inputs, (list, tuple)):
            raise JaonnxError(f"expected a text or a list of texts, got {type(inputs).__name__}")
        texts = [inputs] if single else list(inputs)
        if not texts:
            raise JaonnxError("no texts given: pass a text or a non-empty list of texts")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise JaonnxError(f"batch_size must be a positive integer, got {batch_size!r}")
        top_k = min(top_k, self.tokenizer.vocab_size)
        rows = [self._ids(t) for t in texts]
        results: list[Any] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            logits = self.logits(chunk)
            for i, ids in enumerate(chunk):
                per_mask = [
                    self._predictions(ids, p, logits[i, k], top_k) for k, p in enumerate(self._mask_positions(ids))
                ]
                results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results[0] if single else results
