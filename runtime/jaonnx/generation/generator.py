"""TextGenerator: KV-cached autoregressive generation and scoring on ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError
from ..recipes import GenerationDefaults
from ..model import ArtifactModel
from ..session import Providers
from .decoder import DecoderSession
from .sampling import SamplingSettings, next_tokens
from .streaming import StreamDecoder, continuation_text

_UNSET: Any = object()


@dataclass
class GenerationResult:
    prompt: str
    text: str  # the generated continuation only
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str  # "eos" or "length"

    @property
    def full_text(self) -> str:
        return self.prompt + self.text

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "text": self.text, "prompt_ids": self.prompt_ids,
            "generated_ids": self.generated_ids, "finish_reason": self.finish_reason,
        }


@dataclass
class ScoreResult:
    text: str
    log_likelihood: float  # natural log, summed over the scored tokens
    num_tokens: int  # tokens scored (all but the first, which has no context)
    perplexity: float
    token_logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class PromptLogprobs:
    """`TextGenerator.prompt_logprobs`: token i > 0 is scored given tokens < i (natural log)."""

    text: str
    ids: list[int]
    tokens: list[str]  # the text each token adds (they join to the decoded text)
    text_offset: list[int]  # where each token starts in the decoded text
    token_logprobs: list[float]  # len(ids) - 1: the first token has no context
    top_logprobs: list[dict[int, float]]  # len(ids) - 1 (or empty when top_k is 0): id -> logprob


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prefill batch: ids left-padded with `pad_id`, the attention mask, and positions
    counted from each row's first real token (pads get 1, as transformers' GPT-2 does)."""
    rows, width = len(prompts), max(map(len, prompts))
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    return ids, mask, positions


@dataclass
class _Run:
    generated: list[list[int]]
    reasons: list[str]

    @classmethod
    def empty(cls, rows: int) -> _Run:
        return cls([[] for _ in range(rows)], ["length"] * rows)


class TextGenerator(ArtifactModel):
    """`gen.generate("近年の機械学習は", max_new_tokens=32)`; `gen.stream(...)`; `gen.score(...)`."""

    task = "text-generation"

    def __init__(self, directory: Path, manifest: Manifest, providers: Providers = "auto", **session_options: Any):
        super().__init__(directory, manifest, providers, **session_options)
        self.defaults: GenerationDefaults = self.recipe.generation
        self.decoder = DecoderSession(self.session, manifest)
        self.eos_id = manifest.special_ids.get("eos")

    # ---- settings -------------------------------------------------------------------------
    def settings(self, prompt_len: int, **overrides: Any) -> SamplingSettings:
        """Card defaults from the recipe, overridden by whatever the caller passed."""
        d = self.defaults
        given = {k: v for k, v in overrides.items() if v is not _UNSET}
        max_new = given.pop("max_new_tokens", None)
        if max_new is None:
            max_new = max(1, d.max_length - prompt_len) if d.max_length else d.max_new_tokens
        min_new = given.pop("min_new_tokens", None)
        if min_new is None:
            min_new = max(0, d.min_length - prompt_len) if d.min_length else d.min_new_tokens
        bad = given.pop("bad_words_ids", None)
        if bad is None:
            bad = [[self._token_id(w)] for w in d.bad_words]
        do_sample = given.pop("do_sample", d.do_sample)
        settings = SamplingSettings(
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            do_sample=do_sample,
            temperature=given.pop("temperature", d.temperature),
            top_k=given.pop("top_k", d.top_k),
            top_p=given.pop("top_p", d.top_p),
            repetition_penalty=given.pop("repetition_penalty", d.repetition_penalty),
            num_return_sequences=given.pop("num_return_sequences", d.num_return_sequences if do_sample else 1),
            bad_words_ids=tuple(tuple(s) for s in bad),
            eos_token_id=given.pop("eos_token_id", self.eos_id),
            seed=given.pop("seed", None),
        )
        if given:
            raise JaonnxError(f"unknown generation option(s): {', '.join(sorted(given))}")
        return settings.validate(self.manifest.vocab_size)

    def _token_id(self, word: str) -> int:
        if word in self.manifest.special_ids:
            return self.manifest.special_ids[word]
        token_id = self.tokenizer.backend.piece_to_id(word)
        if token_id is None:
            raise JaonnxError(f"bad word {word!r} is not a token of this model")
        return token_id

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise JaonnxError(f"a prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise JaonnxError("empty prompt: pass some text to continue")
        ids = self.tokenizer.encode_text(prompt)
        if not ids:
            raise JaonnxError(f"prompt {prompt[:40]!r} encodes to no tokens: pass some text to continue")
        return ids

    def _check_length(self, longest: int, max_new: int) -> None:
        limit = self.manifest.max_positions
        if longest >= limit:
            raise JaonnxError(f"prompt is {longest} tokens but the model has {limit} positions: shorten it")
        if longest + max_new > limit:
            raise JaonnxError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the model's {limit} positions: "
                f"lower max_new_tokens to {limit - longest} or less"
            )

    # ---- the decoding loop ----------------------------------------------------------------
    def _steps(self, prompts: list[list[int]], settings: SamplingSettings, run: _Run) -> Iterator[np.ndarray]:
        """Left-padded batch decoding, one step per `yield` (the tokens of every row);
        generated ids and finish reasons accumulate in `run`."""
        rows = len(prompts)
        self._check_length(max(map(len, prompts)), settings.max_new_tokens)
        ids, mask, positions = left_padded(prompts, self.pad_id)
        next_position = positions[:, -1] + 1
        rng = np.random.default_rng(settings.seed)
        history = [list(p) for p in prompts]
        done = np.zeros(rows, dtype=bool)

        self.decoder.reset(rows)
        logits = self.decoder.forward(ids, mask, positions, keep=1)[:, -1]
        for step in range(settings.max_new_tokens):
            tokens = np.where(done, self.pad_id, next_tokens(logits, history, step, settings, rng))
            for i in np.flatnonzero(~done):
                run.generated[i].append(int(tokens[i]))
                history[i].append(int(tokens[i]))
                if tokens[i] == settings.eos_token_id:
                    done[i] = True
                    run.reasons[i] = "eos"
            yield tokens
            if done.all() or step == settings.max_new_tokens - 1:
                return
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
            logits = self.decoder.forward(tokens[:, None], mask, next_position[:, None], keep=1)[:, -1]
            next_position = next_position + 1

    # ---- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int | None = _UNSET,
        *,
        do_sample: bool = _UNSET,
        temperature: float = _UNSET,
        top_k: int = _UNSET,
        top_p: float = _UNSET,
        repetition_penalty: float = _UNSET,
        min_new_tokens: int | None = _UNSET,
        bad_words_ids: list[list[int]] | None = _UNSET,
        eos_token_id: int | None = _UNSET,
        num_return_sequences: int = _UNSET,
        seed: int | None = _UNSET,
        return_ids: bool = False,
    ) -> Any:
        """Continue each prompt. Returns the generated texts (a str for one prompt and one
        sequence, else a list); with `return_ids=True`, `GenerationResult`s with the ids."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if not texts:
            raise JaonnxError("no prompts given: pass a prompt or a non-empty list of prompts")
        encoded = [self.encode(t) for t in texts]
        settings = self.settings(
            max(map(len, encoded)), max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            min_new_tokens=min_new_tokens, bad_words_ids=bad_words_ids, eos_token_id=eos_token_id,
            num_return_sequences=num_return_sequences, seed=seed,
        )
        n = settings.num_return_sequences
        rows = [ids for ids in encoded for _ in range(n)]
        row_texts = [t for t in texts for _ in range(n)]
        run = _Run.empty(len(rows))
        for _ in self._steps(rows, settings, run):
            pass
        generated, reasons = run.generated, run.reasons
        results = [
            GenerationResult(prompt, continuation_text(self._decode, p, g), p, g, r)
            for prompt, p, g, r in zip(row_texts, rows, generated, reasons)
        ]
        if return_ids:
            return results[0] if single and n == 1 else results
        out = [r.text for r in results]
        return out[0] if single and n == 1 else out

    def stream(self, prompt: str, max_new_tokens: int | None = _UNSET, **options: Any) -> Iterator[str]:
        """Yield text pieces as tokens arrive; joined, they equal `generate(...)`'s text."""
        if not isinstance(prompt, str):
            raise JaonnxError("stream takes one prompt (a str)")
        ids = self.encode(prompt)
        options.setdefault("num_return_sequences", 1)
        settings = self.settings(len(ids), max_new_tokens=max_new_tokens, **options)
        if settings.num_return_sequences != 1:
            raise JaonnxError("stream makes one sequence: leave num_return_sequences at 1")
        decoder = StreamDecoder(self._decode, ids)
        for tokens in self._steps([ids], settings, _Run.empty(1)):
            piece = decoder.push(int(tokens[0]))
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def score(self, texts: str | Sequence[str]) -> Any:
        """Log-likelihood and perplexity of each text under the model (natural log).

        The first token has no context and is not scored, as in transformers' LM loss."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise JaonnxError("no texts given: pass a text or a non-empty list of texts")
        results = []
        for text in items:
            ids = self.encode(text)
            logprobs = self._next_token_logprobs(text, ids)
            n = len(ids)
            token_lp = logprobs[np.arange(n - 1), ids[1:]]
            total = float(token_lp.sum())
            results.append(ScoreResult(text, total, n - 1, float(np.exp(-total / (n - 1))), token_lp.tolist()))
        return results[0] if single else results

    def prompt_logprobs(self, text: str, top_k: int = 0) -> PromptLogprobs:
        """Per-token log-probabilities of `text` with the `top_k` likeliest alternatives at each
        position: what OpenAI's `echo` + `logprobs` returns. The same numbers as `score`."""
        if not 0 <= top_k <= self.tokenizer.vocab_size:
            raise JaonnxError(f"top_k must be between 0 and {self.tokenizer.vocab_size}, got {top_k}")
        ids = self.encode(text)
        logprobs = self._next_token_logprobs(text, ids)
        n = len(ids)
        tokens, offsets, before = [], [], ""
        for i in range(n):  # each token's text is what it adds to the decoded prefix
            upto = self.tokenizer.decode(ids[: i + 1])
            piece = upto[len(before):] if upto.startswith(before) else self.tokenizer.token_str(ids[i])
            offsets.append(len(before))
            tokens.append(piece)
            before = upto
        top: list[dict[int, float]] = []
        if top_k:
            known = logprobs[:, : self.tokenizer.vocab_size]  # a padded embedding table has ids past the tokenizer
            part = np.argpartition(-known, top_k - 1, axis=-1)[:, :top_k]
            order = np.argsort(-np.take_along_axis(known, part, axis=-1), axis=-1, kind="stable")
            best = np.take_along_axis(part, order, axis=-1)
            top = [{int(t): float(logprobs[i, t]) for t in best[i]} for i in range(n - 1)]
        return PromptLogprobs(text, ids, tokens, offsets, logprobs[np.arange(n - 1), ids[1:]].tolist(), top)

    def _next_token_logprobs(self, text: str, ids: list[int]) -> np.ndarray:
        """(len(ids) - 1, vocab) float64 log-softmax of the logits predicting ids[1:]."""
        if len(ids) < 2:
            raise JaonnxError(f"{text!r} is one token: scoring needs at least two")
        self._check_length(len(ids), 0)
        n = len(ids)
        self.decoder.reset(1)
        logits = self.decoder.forward(
            np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], keep=n
        )[0, : n - 1].astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
