"""Logits processors and sampling in numpy, with transformers' semantics.

Order as in transformers' `generate`: repetition penalty, min-new-tokens, bad words (these
change which tokens are allowed), then temperature, top-k, top-p (these shape sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from ..errors import JaonnxError
from ..numeric import softmax
from .spec import INT64, MAX_LOGPROBS, MAX_STOPS, MAX_TOKENS, OptionSpec, option

if TYPE_CHECKING:
    from .constraints import ConstraintSpec

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class SamplingSettings:
    """One request's resolved generation settings. This class is the single source of the
    generation options: each field's `option(...)` metadata (help, bounds, CLI/HTTP) is what
    `GENERATION_OPTIONS`, the HTTP schemas, the CLI and `validate` are derived from."""

    max_new_tokens: int = option(help="Tokens to generate (default: the model card's).", type=int, ge=1, le=MAX_TOKENS,
                                 flags=("--max-new-tokens", "-n"), openai="max_tokens")
    min_new_tokens: int = option(0, help="Tokens to generate before end-of-text is allowed.", type=int, ge=0,
                                 le=MAX_TOKENS)
    do_sample: bool = option(False, help="Sample, or decode greedily (default: the card's).", type=bool,
                             flags=("--sample/--greedy",))
    temperature: float = option(1.0, help="Sampling temperature (0 = greedy).", type=float, ge=0, le=1e6)
    top_k: int = option(0, help="Keep the k most likely tokens (0 = off).", type=int, ge=0, le=INT64)
    top_p: float = option(1.0, help="Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1].",
                          type=float, gt=0, le=1)
    repetition_penalty: float = option(1.0, help="> 1 discourages tokens already in the text.", type=float, gt=0,
                                       le=1e6)
    num_return_sequences: int = option(1, help="Samples per prompt.", type=int, ge=1, le=64, openai="n")
    seed: int | None = option(None, help="Seed for reproducible sampling.", type=int, ge=0, le=INT64, nullable=True)
    stop: tuple[str, ...] = option((), help=f"Stop before any of these strings (at most {MAX_STOPS}).", type=list[str])
    eos_token_id: int | None = option(None, help="End-of-text token id (default: the model's; None in Python: none).",
                                      type=int, ge=0, le=INT64, nullable=True)
    bad_words_ids: tuple[tuple[int, ...], ...] = option(
        (), help="Token-id sequences that must never be generated.", type=list[list[int]], cli=False)
    prompt_lookup: int = option(0, help="Greedy only: draft up to N tokens by matching the prompt's n-grams "
                                "(exact: the output equals plain greedy).", type=int, ge=0, le=64)
    logprobs: int | None = option(None, help="Also return the log-probability of each generated token and the top N.",
                                  type=int, ge=0, le=MAX_LOGPROBS, nullable=True)
    prompt_logprobs: int | None = option(
        None, help="Also return the log-probability of each prompt token after the first, and the top N (as vLLM).",
        type=int, ge=0, le=MAX_LOGPROBS, nullable=True, cli=False)
    # Structured output, compiled from the constraint options by `resolve_settings`
    # (generation/constraints.py): a result of resolution, not an option of its own.
    constraint: ConstraintSpec | None = field(default=None, metadata={"option": None})

    def validate(self, vocab_size: int) -> SamplingSettings:
        """Every field against its `option` metadata, then the rules that tie fields together
        or depend on the model. The first problem is a `JaonnxError` naming its field."""
        def fail(name: str, rule: str, value: object) -> None:
            raise JaonnxError(f"{name} must be {rule}, got {value!r}", name)

        for f in fields(self):
            spec: OptionSpec | None = f.metadata.get("option")
            if spec is None:
                continue
            value = getattr(self, f.name)
            if value is None and spec.nullable:
                continue
            if not _fits(value, spec):
                fail(f.name, spec.rule(), value)
        if self.num_return_sequences > 1 and not self.do_sample:
            fail("num_return_sequences", "1 with greedy decoding (every copy would be identical)",
                 self.num_return_sequences)
        for seq in self.bad_words_ids:
            if not seq or not all(_is_int(t) and 0 <= t < vocab_size for t in seq):
                fail("bad_words_ids", f"non-empty lists of token ids in [0, {vocab_size})", list(seq))
        if self.eos_token_id is not None and not self.eos_token_id < vocab_size:
            fail("eos_token_id", f"a token id in [0, {vocab_size}) or None", self.eos_token_id)
        if len(self.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", f"at most {MAX_STOPS} non-empty strings", list(self.stop))
        if self.prompt_lookup and not self.greedy:
            fail("prompt_lookup", "0 when sampling (it is exact for greedy decoding only)", self.prompt_lookup)
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _fits(value: object, spec: OptionSpec) -> bool:
    """Whether a scalar option's value has its type and lies within its bounds (list-typed
    options have their own rules in `validate`)."""
    if spec.type is bool:
        return isinstance(value, (bool, np.bool_))
    if spec.type is int:
        ok = _is_int(value)
    elif spec.type is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and bool(np.isfinite(value))
    else:
        return True
    return ok and (spec.ge is None or value >= spec.ge) and (spec.gt is None or value > spec.gt) \
        and (spec.le is None or value <= spec.le)  # type: ignore[operator]


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
