"""TextGenerator: generation and scoring on ONNX Runtime, as one-request uses of the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError
from ..model import ArtifactModel
from ..recipes import GenerationDefaults
from ..session import Providers
from . import cuda_graphs
from .batch import BatchDecoder
from .decoder import ConcatBatchDecoder, DecoderSession, KVOps
from .static_cache import StaticBatchDecoder
from .constraints import Constraints
from ..tokenization.token_bytes import TokenVocabulary
from .engine import GenerationEngine, RequestOutput, TokenLogprob
from .inputs import InputProcessor, ProcessedPrompt
from .options import resolve_settings
from .sampling import SamplingSettings
from .spec import MAX_LOGPROBS


@dataclass
class GenerationResult:
    prompt: str
    text: str  # the generated continuation only (cut at a stop string)
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    logprobs: list[TokenLogprob] | None = None  # one per generated id, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt id after the first, when asked for
    constraint: str | None = None  # structured output: "satisfied" | "incomplete" | "failed"
    error: str | None = None  # why a constraint failed

    @property
    def full_text(self) -> str:
        return self.prompt + self.text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("logprobs", "prompt_logprobs", "constraint", "error"):
            if data[name] is None:
                del data[name]
        return data


class ResultCollector:
    """Gathers the outputs of a group of requests (one per prompt, n sequences each) into
    `GenerationResult`s, rows prompt-major (row = prompt * n + sequence index)."""

    def __init__(self, prompts: Sequence[str], request_ids: Sequence[str], n: int) -> None:
        self.prompts, self.n = list(prompts), n
        self._first_row = {rid: i * n for i, rid in enumerate(request_ids)}
        self._finals: dict[int, RequestOutput] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self._prompt_logprobs: dict[int, list[TokenLogprob]] = {}

    @property
    def request_ids(self) -> list[str]:
        return list(self._first_row)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._first_row

    def take(self, out: RequestOutput) -> int:
        """Record one output; returns its row."""
        row = self._first_row[out.request_id] + out.index
        if out.logprobs is not None:
            self._logprobs.setdefault(row, []).extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[row] = out.prompt_logprobs
        if out.finished:
            self._finals[row] = out
        return row

    @property
    def done(self) -> bool:
        return len(self._finals) == len(self.prompts) * self.n

    def results(self) -> list[GenerationResult]:
        return [
            GenerationResult(
                self.prompts[row // self.n], out.text, list(out.prompt_ids), out.token_ids, str(out.finish_reason),
                self._logprobs.get(row) if out.logprobs is not None else None, self._prompt_logprobs.get(row),
                out.constraint, out.error,
            )
            for row, out in sorted(self._finals.items())
        ]


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


class TextGenerator(ArtifactModel):
    """`gen.generate("近年の機械学習は", max_new_tokens=32)`; `gen.stream(...)`; `gen.score(...)`;
    `gen.engine()` for continuous batching. Options: `jaonnx.generation.GENERATION_OPTIONS`."""

    task = "text-generation"

    def __init__(self, directory: Path, manifest: Manifest, providers: Providers = "auto", **session_options: Any):
        # CUDA graph capture: on by default for static fp16 decoders (cuda_graphs.check_option)
        session_options["cuda_graph"] = cuda_graphs.check_option(session_options.get("cuda_graph"), manifest)
        super().__init__(directory, manifest, providers, **session_options)
        self.defaults: GenerationDefaults = self.recipe.generation
        self.eos_id = manifest.special_ids.get("eos")

    # ---- settings and prompts ---------------------------------------------------------------
    def settings(self, prompt_len: int, **options: Any) -> SamplingSettings:
        """Card defaults from the recipe, overridden by the caller's options (None = default),
        validated and checked against the model's positions."""
        settings = resolve_settings(
            self.defaults, prompt_len, max_positions=self.manifest.max_positions,
            vocab_size=self.manifest.vocab_size, model_eos_id=self.eos_id, token_id=self._token_id, **options,
        )
        if settings.constraint is not None:
            self.constraints.compile(settings.constraint)  # a bad schema/regex/grammar fails here, cached
        return settings

    @cached_property
    def constraints(self) -> Constraints:
        """Structured output for this model's vocabulary (llguidance loads on first use)."""
        backend = self.tokenizer.backend
        return Constraints(
            lambda: TokenVocabulary.from_backend(backend, self.manifest.special_ids.values(), self.eos_id),
            backend.encode_exact,
        )

    @cached_property
    def inputs(self) -> InputProcessor:
        """The one input processor (Python and HTTP): prompts + options -> ProcessedPrompt."""
        return InputProcessor(self.encode, self.settings)

    def process(self, prompts: str | Sequence[str], **options: Any) -> list[ProcessedPrompt]:
        """Each prompt encoded once, with settings resolved for its own length."""
        return self.inputs.process(prompts, **options)

    def _token_id(self, word: str) -> int:
        if word in self.manifest.special_ids:
            return self.manifest.special_ids[word]
        token_id = self.tokenizer.backend.piece_to_id(word)
        if token_id is None:
            raise JaonnxError(f"bad word {word!r} is not a token of this model", "bad_words_ids")
        return token_id

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise JaonnxError(f"a prompt must be a str, got {type(prompt).__name__}", "prompt")
        if not prompt.strip():
            raise JaonnxError("empty prompt: pass some text to continue", "prompt")
        ids = self.tokenizer.encode_text(prompt)
        if not ids:
            raise JaonnxError(f"prompt {prompt[:40]!r} encodes to no tokens: pass some text to continue", "prompt")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- the engine ---------------------------------------------------------------------------
    @cached_property
    def decoder(self) -> DecoderSession:
        """The concat-layout graph driver (shared by every batch of this model)."""
        return DecoderSession(self.session, self.manifest)

    @cached_property
    def kv_ops(self) -> KVOps:
        return KVOps(self.decoder)

    def new_batch(self) -> BatchDecoder:
        """An empty running batch over this model's graph (one per engine), for the artifact's
        KV-cache layout."""
        return BATCH_DECODERS[self.manifest.decoder.kv_layout](self)

    def engine(self, max_batch_size: int = 16, **options: Any) -> GenerationEngine:
        """A continuous-batching engine over this model: add_request / step / abort_request.
        `options`: the engine's scheduling options (`max_prefill_tokens`, `prefix_cache`,
        `prefix_cache_mb`; see `GenerationEngine`)."""
        return GenerationEngine(
            self.new_batch(), decode=self.decode, encode=self.encode, resolve=self.settings,
            pad_id=self.pad_id, max_batch_size=max_batch_size, constraints=self.constraints, **options,
        )

    # ---- public API -----------------------------------------------------------------------
    def generate(
        self, prompts: str | Sequence[str], max_new_tokens: int | None = None, *, return_ids: bool = False, **options: Any
    ) -> Any:
        """Continue each prompt. Returns the generated texts (a str for one prompt and one
        sequence, else a list, prompt-major); with `return_ids=True`, `GenerationResult`s.

        Each prompt runs as its own request (with its own seeded RNG) in one batch, so a row
        gives what it gives alone."""
        single = isinstance(prompts, str)
        options["max_new_tokens"] = max_new_tokens
        inputs = self.process(prompts, **options)  # every error before any work
        n = inputs[0].settings.num_return_sequences
        results = self.run(inputs)
        if return_ids:
            return results[0] if single and n == 1 else results
        out_texts = [r.text for r in results]
        return out_texts[0] if single and n == 1 else out_texts

    def run(self, inputs: Sequence[ProcessedPrompt]) -> list[GenerationResult]:
        """Run processed prompts as one batch of engine requests; results prompt-major."""
        n = inputs[0].settings.num_return_sequences
        # One call's prompts arrive together: they are prefilled in one batched forward, which
        # a prefix cache (filled chunk by chunk, for prompts that arrive over time) would prevent.
        engine = self.engine(max_batch_size=max(1, n * len(inputs)), prefix_cache=False)
        request_ids = [engine.add_request(p) for p in inputs]
        collector = ResultCollector([p.text for p in inputs], request_ids, n)
        while engine.has_unfinished_requests():
            for out in engine.step():
                collector.take(out)
        return collector.results()

    def stream(self, prompt: str, max_new_tokens: int | None = None, **options: Any) -> Iterator[str]:
        """Yield text pieces as tokens arrive; joined, they equal `generate(...)`'s text."""
        if not isinstance(prompt, str):
            raise JaonnxError("stream takes one prompt (a str)", "prompt")
        options.setdefault("num_return_sequences", 1)
        options["max_new_tokens"] = max_new_tokens
        [processed] = self.process(prompt, **options)
        if processed.settings.num_return_sequences != 1:
            raise JaonnxError("stream makes one sequence: leave num_return_sequences at 1", "num_return_sequences")
        engine = self.engine(max_batch_size=1)
        engine.add_request(processed)
        return self._pieces(engine)

    @staticmethod
    def _pieces(engine: GenerationEngine) -> Iterator[str]:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.new_text:
                    yield out.new_text

    def scoring_inputs(self, texts: str | Sequence[str], top_k: int = 0, at_least: int = 2) -> list[ProcessedPrompt]:
        """Texts to score, as engine requests: each asks for its prompt's log-probabilities
        (with the `top_k` likeliest alternatives) and one greedy token, which is not used.
        Scoring runs through the engine like generation (on the server's worker thread).
        A text needs `at_least` tokens (the first one has no context to be scored in)."""
        inputs = self.process(texts, max_new_tokens=1, min_new_tokens=0, do_sample=False, bad_words_ids=[],
                              stop=(), prompt_lookup=0, logprobs=None, prompt_logprobs=top_k)
        for i, p in enumerate(inputs):
            if len(p.ids) < at_least:
                raise JaonnxError(f"{p.text!r} is one token: scoring needs at least two",
                                  "prompt" if len(inputs) == 1 else f"prompt[{i}]")
        return inputs

    def score(self, texts: str | Sequence[str]) -> Any:
        """Log-likelihood and perplexity of each text under the model (natural log).

        The first token has no context and is not scored, as in transformers' LM loss."""
        single = isinstance(texts, str)
        results = [self.score_result(r) for r in self.run(self.scoring_inputs(texts))]
        return results[0] if single else results

    @staticmethod
    def score_result(result: GenerationResult) -> ScoreResult:
        """A `ScoreResult` from a result that carries its prompt's log-probabilities."""
        if result.prompt_logprobs is None:
            raise JaonnxError("this result has no prompt log-probabilities: ask for prompt_logprobs", "prompt_logprobs")
        token_lp = [lp.logprob for lp in result.prompt_logprobs]
        total, n = float(sum(token_lp)), len(token_lp)
        return ScoreResult(result.prompt, total, n, float(np.exp(-total / n)) if n else float("nan"), token_lp)

    def prompt_logprobs(self, text: str, top_k: int = 0) -> PromptLogprobs:
        """Per-token log-probabilities of `text` with the `top_k` likeliest alternatives at each
        position: what OpenAI's `echo` + `logprobs` returns. The same numbers as `score`."""
        if not isinstance(top_k, int) or not 0 <= top_k <= MAX_LOGPROBS:
            raise JaonnxError(f"top_k must be between 0 and {MAX_LOGPROBS}, got {top_k!r}", "top_k")
        [result] = self.run(self.scoring_inputs(text, top_k))
        return self.prompt_logprobs_result(result)

    def prompt_logprobs_result(self, result: GenerationResult) -> PromptLogprobs:
        """`PromptLogprobs` (tokens, offsets, alternatives) from a result that carries them."""
        lps = result.prompt_logprobs or []
        ids = result.prompt_ids
        tokens = self.token_texts(ids)
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
        top = [dict(lp.top) for lp in lps] if any(lp.top for lp in lps) else []
        return PromptLogprobs(result.prompt, ids, tokens, offsets, [lp.logprob for lp in lps], top)

    def token_texts(self, ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
        """The text each of `ids` adds after `context` and the ids before it (they join to the
        decoded text; a token inside a multi-byte character adds "" until the character ends)."""
        pieces, before = [], self.tokenizer.decode(list(context))
        for i in range(len(ids)):
            upto = self.tokenizer.decode([*context, *ids[: i + 1]])
            pieces.append(upto[len(before) :] if upto.startswith(before) else self.tokenizer.token_str(ids[i]))
            before = upto
        return pieces


# KV-cache layout (manifest `decoder.kv_layout`) -> the BatchDecoder that drives it.
BATCH_DECODERS: dict[str, Callable[[TextGenerator], BatchDecoder]] = {
    "concat": lambda gen: ConcatBatchDecoder(gen.decoder, gen.kv_ops, gen.pad_id),
    "static": lambda gen: StaticBatchDecoder(gen.session, gen.manifest),
}
