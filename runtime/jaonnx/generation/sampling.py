"""Logits processors and sampling in numpy, with transformers' semantics.

Order as in transformers' `generate`: repetition penalty, min-new-tokens, bad words (these
change which tokens are allowed), then temperature, top-k, top-p (these shape sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import JaonnxError
from ..numeric import softmax

if TYPE_CHECKING:
    from .constraints import ConstraintSpec

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | None = None
    num_return_sequences: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop before any of these strings
    prompt_lookup: int = 0  # greedy: draft up to this many tokens from the prompt's n-grams
    logprobs: int | None = None  # return each generated token's log-probability and the top N
    constraint: ConstraintSpec | None = None  # structured output (generation/constraints.py)

    def validate(self, vocab_size: int) -> SamplingSettings:
        def fail(name: str, rule: str, value: object) -> None:
            raise JaonnxError(f"{name} must be {rule}, got {value!r}", name)

        def is_int(value: object) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if not isinstance(self.do_sample, (bool, np.bool_)):
            fail("do_sample", "true or false", self.do_sample)
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            fail("min_new_tokens", "an integer >= 0", self.min_new_tokens)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            fail("temperature", "a number >= 0", self.temperature)
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 turns it off)", self.top_k)
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            fail("repetition_penalty", "a number > 0 (1 turns it off)", self.repetition_penalty)
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            fail("num_return_sequences", "an integer >= 1", self.num_return_sequences)
        if self.num_return_sequences > 1 and not self.do_sample:
            fail("num_return_sequences", "1 with greedy decoding (every copy would be identical)",
                 self.num_return_sequences)
        for seq in self.bad_words_ids:
            if not seq or not all(is_int(t) and 0 <= t < vocab_size for t in seq):
                fail("bad_words_ids", f"non-empty lists of token ids in [0, {vocab_size})", list(seq))
        if self.eos_token_id is not None and not (is_int(self.eos_token_id) and 0 <= self.eos_token_id < vocab_size):
            fail("eos_token_id", f"a token id in [0, {vocab_size}) or None", self.eos_token_id)
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            fail("seed", "an integer >= 0 or None", self.seed)
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "at most 4 non-empty strings", list(self.stop))
        if not is_int(self.prompt_lookup) or self.prompt_lookup < 0:
            fail("prompt_lookup", "an integer >= 0 (0 turns it off)", self.prompt_lookup)
        if self.prompt_lookup and not self.greedy:
            fail("prompt_lookup", "0 when sampling (it is exact for greedy decoding only)", self.prompt_lookup)
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            fail("logprobs", "an integer in [0, 20] or None", self.logprobs)
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, history: list[list[int]], penalty: float) -> None:
    if penalty == 1.0:
        return
    for row, seen in enumerate(history):
        ids = np.unique(np.asarray(seen, dtype=np.int64))
        values = logits[row, ids]
        logits[row, ids] = np.where(values < 0, values * penalty, values / penalty)


def apply_min_new_tokens(logits: np.ndarray, generated: int, settings: SamplingSettings) -> None:
    if settings.eos_token_id is not None and generated < settings.min_new_tokens:
        logits[:, settings.eos_token_id] = NEG_INF


def apply_bad_words(logits: np.ndarray, history: list[list[int]], bad_words: tuple[tuple[int, ...], ...]) -> None:
    """Ban a sequence's last token wherever the row ends with the rest of that sequence."""
    for seq in bad_words:
        head, last = list(seq[:-1]), seq[-1]
        for row, seen in enumerate(history):
            if not head or seen[-len(head):] == head:
                logits[row, last] = NEG_INF


def apply_top_k(logits: np.ndarray, top_k: int) -> None:
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = NEG_INF


def apply_top_p(logits: np.ndarray, top_p: float) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as transformers
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    remove = np.cumsum(probs, axis=-1) <= (1 - top_p)
    remove[:, -1] = False
    np.put_along_axis(logits, order, np.where(remove, NEG_INF, sorted_logits), axis=-1)


def next_tokens(
    logits: np.ndarray, history: list[list[int]], generated: int, settings: SamplingSettings, rng: np.random.Generator
) -> np.ndarray:
    """Pick one token per row from last-position logits [rows, vocab]."""
    untouched = settings.repetition_penalty == 1.0 and not settings.bad_words_ids and (
        settings.eos_token_id is None or generated >= settings.min_new_tokens)
    if settings.greedy and untouched:
        return np.asarray(logits).argmax(axis=-1)  # nothing to change: no copy of the vocabulary
    logits = np.array(logits, dtype=np.float32, copy=True)
    apply_repetition_penalty(logits, history, settings.repetition_penalty)
    apply_min_new_tokens(logits, generated, settings)
    apply_bad_words(logits, history, settings.bad_words_ids)
    if settings.greedy:
        return logits.argmax(axis=-1)
    logits /= np.float32(settings.temperature)
    apply_top_k(logits, settings.top_k)
    apply_top_p(logits, settings.top_p)
    probs = softmax(logits)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < draws).sum(axis=-1), probs.shape[-1] - 1)
