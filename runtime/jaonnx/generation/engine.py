"""GenerationEngine: continuous batching as a library object (after vLLM's `LLMEngine`).

    engine = gen.engine(max_batch_size=16)
    rid = engine.add_request("近年の機械学習は", max_new_tokens=32, do_sample=False)
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.index, out.new_text, out.finished)

This module is the engine core (vLLM v1's scheduler and busy loop): every `step()` runs one
decode forward for all running rows, then prefills joining prompts under a token budget
(`max_prefill_tokens`: a long prompt is prefilled in chunks over several steps, so running
rows keep getting tokens meanwhile), starting from cached prefix KV where a prompt begins like
an earlier one (`prefix_cache`), samples one token per row with each request's own settings
and RNG, and hands the tokens to output processing (`output.py`: text, stop strings,
logprobs, `RequestOutput`s). Prompt lookup lives in `prompt_lookup.py`. A request joins the
batch as soon as its prompt is prefilled and leaves it as soon as it is finished or aborted.
`TextGenerator.generate`/`stream` and the HTTP server all drive this one loop; the engine owns
the KV cache (through a `BatchDecoder`) and all per-request state.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import JaonnxError
from . import prompt_lookup
from .batch import BatchDecoder, JoiningRow
from .constraints import Constraints, constrain_logits
from .inputs import ProcessedPrompt
from .output import Decode, OutputProcessor, RequestOutput, SequenceState, TokenLogprob, prompt_logprobs
from .prefix_cache import DEFAULT_MB, PrefixCache
from .sampling import SamplingSettings, next_tokens

__all__ = ["DEFAULT_PREFILL_TOKENS", "GenerationEngine", "RequestOutput", "TokenLogprob", "prompt_logprobs"]

# Prompt tokens prefilled per step while rows are running. Chosen by measurement
# (benchmarks/results/head_of_line_steps.md, GPT-2 small shape int8, CPU time per step): with 4
# rows decoding, a 900-token prompt's longest step falls from 66x the decode step (whole) to
# 7.6x at 64 (5.4x at 32), and its time to first token grows 1.32x (1.92x at 32, 1.09x at 128).
DEFAULT_PREFILL_TOKENS = 64


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    settings: SamplingSettings
    rng: np.random.Generator
    prompt_text: str
    sequences: list[SequenceState]
    steps: int = 0
    logits: np.ndarray | None = None  # [n, vocab] or, after a speculative block, [n, k, vocab]
    drafted: list[int] = field(default_factory=list)  # tokens under verification (prompt lookup)
    joining: JoiningRow | None = None  # the prompt's cache while it is prefilled
    prompt_logprobs: list[TokenLogprob] | None = None  # computed once prefilled, sent with the first output

    @property
    def rows(self) -> int:
        return len(self.sequences)

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.sequences)

    @property
    def reserve(self) -> int:
        return len(self.prompt_ids) + self.settings.max_new_tokens


class GenerationEngine:
    """Continuous batching over one `BatchDecoder`. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        batch: BatchDecoder,
        *,
        decode: Decode,
        encode: Callable[[str], list[int]],
        resolve: Callable[..., SamplingSettings],
        pad_id: int,
        max_batch_size: int = 16,
        max_prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        prefix_cache: bool = True,
        prefix_cache_mb: float = DEFAULT_MB,
        constraints: Constraints | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise JaonnxError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}", "max_batch_size")
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1):
            raise JaonnxError(f"max_prefill_tokens must be an integer >= 1 (or None: whole prompts), "
                              f"got {max_prefill_tokens!r}", "max_prefill_tokens")
        if not isinstance(prefix_cache_mb, (int, float)) or prefix_cache_mb < 0:
            raise JaonnxError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}", "prefix_cache_mb")
        self.batch = batch
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache else None
        self.output = OutputProcessor(decode)
        self._decode = decode
        self._encode = encode
        self._resolve = resolve
        self._pad = pad_id
        self._constraints = constraints
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []  # admitted, prompt not yet fully in the cache
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self.tokens_generated = 0  # over the engine's life, for throughput figures
        self.prompt_tokens_computed = 0  # prompt tokens prefilled (cached prefixes not counted)
        self.last_step_rows = 0  # rows the last step() decoded

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: ProcessedPrompt | str | Sequence[int],
        request_id: str | None = None,
        *,
        settings: SamplingSettings | None = None,
        **options: Any,
    ) -> str:
        """Queue a prompt (text, or token ids) with generation options (see GENERATION_OPTIONS;
        left out, they come from the model card), or with `settings` already resolved by
        `TextGenerator.settings`, or as a `ProcessedPrompt` (`TextGenerator.process`: ids,
        text and settings; nothing is encoded, decoded or resolved again). Errors are raised
        here, before any work."""
        if isinstance(prompt, ProcessedPrompt):
            if settings is not None or options:
                raise JaonnxError("a processed prompt carries its settings: pass no options", "settings")
            prompt_ids, prompt_text, settings = list(prompt.ids), prompt.text, prompt.settings
        elif isinstance(prompt, str):
            prompt_ids, prompt_text = self._encode(prompt), prompt
        else:
            prompt_ids = _token_ids(prompt)
            prompt_text = self._decode(prompt_ids)
        if settings is None:
            settings = self._resolve(len(prompt_ids), **options)
        elif options:
            raise JaonnxError("pass either settings or options, not both", next(iter(options)))
        if settings.num_return_sequences > self.max_batch_size:
            raise JaonnxError(
                f"num_return_sequences ({settings.num_return_sequences}) exceeds this engine's max_batch_size "
                f"({self.max_batch_size}): lower it", "num_return_sequences",
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if self._find(request_id) is not None:
            raise JaonnxError(f"request id {request_id!r} is already in use: pass a new one", "request_id")
        sequences = self.output.sequences(prompt_ids, settings.num_return_sequences)
        if settings.constraint is not None:  # structured output: one matcher per sequence
            if self._constraints is None:
                raise JaonnxError("this engine was built without structured output support", settings.constraint.kind)
            for seq in sequences:
                seq.matcher = self._constraints.matcher(settings.constraint, settings.eos_token_id)
        self._waiting.append(
            _Request(request_id, prompt_ids, settings, np.random.default_rng(settings.seed), prompt_text, sequences)
        )
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Drop a request, waiting or running; its rows leave the batch at once. Returns
        whether it was known (an already finished request is not)."""
        for i, req in enumerate(self._waiting):
            if req.request_id == request_id:
                del self._waiting[i]
                return True
        for i, req in enumerate(self._prefilling):
            if req.request_id == request_id:
                del self._prefilling[i]  # its cache is its own: nothing in the batch changes
                return True
        for req in self._running:
            if req.request_id == request_id:
                self._running_keep([r for r in self._running if r is not req])
                return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    @property
    def num_running_rows(self) -> int:
        return sum(r.rows for r in self._running)

    @property
    def num_waiting_requests(self) -> int:
        """Requests whose prompts are not fully prefilled yet (queued or mid-prefill)."""
        return len(self._waiting) + len(self._prefilling)

    def _find(self, request_id: str) -> _Request | None:
        requests = itertools.chain(self._waiting, self._prefilling, self._running)
        return next((r for r in requests if r.request_id == request_id), None)

    # ---- one iteration ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One decode forward for the running rows, up to `max_prefill_tokens` of joining
        prompts, one sampled token (or a verified speculative block) per row. Returns each
        sequence's news; a prompt finished this step yields its first token in this step."""
        self._forward()
        scored = self._score_only()
        self._prefill()
        self.last_step_rows = self.batch.rows
        outputs: list[RequestOutput] = []
        for req in scored:
            outputs.extend(self._advance(req))
        for req in self._running:
            outputs.extend(self._advance(req))
        self._running_keep([r for r in self._running if not r.finished])
        return outputs

    def _forward(self) -> None:
        """Feed every running row its last token (plus a drafted block under verification)."""
        if not self._running:
            return
        last = [seq.generated[-1] if seq.generated else self._pad for req in self._running for seq in req.sequences]
        drafted = [req.drafted for req in self._running if req.drafted]
        if not drafted:
            logits = self.batch.step(np.array(last, dtype=np.int64)[:, None])[:, 0]
        else:  # prompt lookup runs for a lone request: its one row carries the block
            logits = self.batch.step(np.array([last + drafted[0]], dtype=np.int64))
        row = 0
        for req in self._running:
            req.logits = logits[row : row + req.rows]
            row += req.rows

    def _prefill(self) -> None:
        """Admit waiting requests whose rows fit (first come, first served), then prefill their
        prompts in order, at most `max_prefill_tokens` tokens this step while rows are running
        (with none, whole prompts: chunks would only add their overhead). A prompt that is done
        joins the running batch now and is sampled in this step."""
        if any(r.drafted for r in self._running):
            return  # a speculative block is being verified (its rejects are cut from every row)
        rows = self.num_running_rows + sum(r.rows for r in self._prefilling)
        while self._waiting and rows + self._waiting[0].rows <= self.max_batch_size:
            self._prefilling.append(self._waiting.popleft())
            rows += self._prefilling[-1].rows
        if self._can_prefill_together():
            self._prefill_together()
            return
        budget = self.max_prefill_tokens if self._running else None  # nobody to stall: no chunk overhead
        budget = budget or sum(len(r.prompt_ids) for r in self._prefilling)
        while self._prefilling and budget > 0:
            req = self._prefilling[0]
            if req.joining is None:
                req.joining = self._open(req)
            start = req.joining.length
            chunk = req.prompt_ids[start : start + prefill_chunk(len(req.prompt_ids) - start, budget)]
            row = req.joining
            scoring = req.settings.prompt_logprobs is not None
            logits = self.batch.fill(row, chunk, every=scoring)
            if scoring:  # position i of the chunk predicts prompt token start + i + 1
                targets = req.prompt_ids[start + 1 : start + 1 + len(chunk)]
                req.prompt_logprobs = (req.prompt_logprobs or []) + prompt_logprobs(
                    logits[: len(targets)], targets, req.settings.prompt_logprobs or 0)
                logits = logits[-1]
            budget -= len(chunk)
            self.prompt_tokens_computed += len(chunk)
            if self.prefix_cache is not None:  # block by block as chunks finish: no copy spike at the end
                self.prefix_cache.store(req.prompt_ids[: row.length], lambda a, b: self.batch.read(row, a, b))
            if req.joining.length < len(req.prompt_ids):
                break  # the budget is spent; the next step goes on
            self._join(self._prefilling.pop(0), logits)

    def _can_prefill_together(self) -> bool:
        """Several fresh prompts, no row running (nobody to stall) and no prefix cache to fill
        block by block: `generate()` with a list of prompts."""
        return (not self._running and self.prefix_cache is None and len(self._prefilling) > 1
                and all(r.joining is None and r.settings.prompt_logprobs is None for r in self._prefilling))

    def _prefill_together(self) -> None:
        """Prefill every admitted prompt in one batched forward (`BatchDecoder.add`): one large
        product instead of one per prompt. Measured on the GPT-2-small shape, int8, 2 threads,
        8 prompts of 128 tokens: 180 ms together against 345 ms one prompt per forward."""
        joining, self._prefilling = self._prefilling, []
        prompts = [req.prompt_ids for req in joining for _ in range(req.rows)]
        logits = self.batch.add(prompts, max(req.reserve for req in joining))
        self.prompt_tokens_computed += sum(len(req.prompt_ids) for req in joining)
        start = 0
        for req in joining:
            req.logits = logits[start : start + req.rows]
            start += req.rows
            self._running.append(req)

    def _score_only(self) -> list[_Request]:
        """Take the waiting requests at the head of the queue that need no KV cache: they want
        their prompt's log-probabilities and a single token (scoring). One full-sequence
        forward gives both, outside the running batch, and they finish in this step."""
        done: list[_Request] = []
        while self._waiting and not self._running and _needs_no_cache(self._waiting[0]):  # (with rows
            # running, a long prompt's one forward would stall them: it is prefilled in chunks instead)
            req = self._waiting.popleft()
            logits = self.batch.logits(req.prompt_ids)  # ids past the tokenizer are masked there
            req.prompt_logprobs = prompt_logprobs(logits[:-1], req.prompt_ids[1:], req.settings.prompt_logprobs or 0)
            req.logits = logits[-1:]
            done.append(req)
        return done

    def _open(self, req: _Request) -> JoiningRow:
        """A joining row for `req`, holding the longest cached prefix of its prompt."""
        if self.prefix_cache is None or req.settings.prompt_logprobs is not None:
            return self.batch.open(req.reserve)  # prompt logprobs need every position's logits
        _, blocks = self.prefix_cache.lookup(req.prompt_ids)
        return self.batch.open(req.reserve, blocks)

    def _join(self, req: _Request, logits: np.ndarray) -> None:
        row = req.joining
        assert row is not None
        self.batch.join(row, req.rows)
        req.joining = None
        if req.settings.prompt_logprobs is not None and req.prompt_logprobs is None:
            req.prompt_logprobs = []  # a one-token prompt: nothing to score
        req.logits = np.repeat(logits[None], req.rows, axis=0)
        self._running.append(req)

    def _running_keep(self, keep: list[_Request]) -> None:
        if len(keep) == len(self._running):
            return
        rows, start = [], 0
        for req in self._running:
            if any(req is k for k in keep):
                rows.extend(range(start, start + req.rows))
            start += req.rows
        self.batch.keep(rows)
        self._running = keep

    # ---- sampling and bookkeeping ------------------------------------------------------------
    def _advance(self, req: _Request) -> list[RequestOutput]:
        """Pick this step's token(s) for every sequence of `req` and report them."""
        was_done = [seq.done for seq in req.sequences]
        if req.drafted:
            accepted = self._verify(req)
        else:
            accepted = [self._sample(req)]
        new: list[list[int]] = [[] for _ in req.sequences]
        new_logits: list[list[np.ndarray]] = [[] for _ in req.sequences]
        s = req.settings
        for tokens, logits in accepted:
            for i, seq in enumerate(req.sequences):
                if seq.done:
                    continue
                token = int(tokens[i])
                seq.generated.append(token)
                new[i].append(token)
                self.tokens_generated += 1
                if s.logprobs is not None:
                    new_logits[i].append(logits[i])
                if token == s.eos_token_id:
                    seq.finish_reason = "eos"
                if seq.matcher is not None:  # structured output: advance; a finished constraint ends the row
                    seq.matcher.advance(token)
                    if seq.matcher.stopped and not seq.done:
                        seq.finish_reason = "stop"
            req.steps += 1
            if req.steps >= s.max_new_tokens:
                for seq in req.sequences:
                    if not seq.done:
                        seq.finish_reason = "length"
            if all(seq.done for seq in req.sequences):
                break
        req.logits = None
        if s.prompt_lookup and not req.finished:
            req.drafted = self._draft(req)
        return self.output.outputs(req.request_id, req.prompt_text, req.prompt_ids, s, req.sequences, new, new_logits,
                                   was_done, req.prompt_logprobs)

    def _sample(self, req: _Request) -> tuple[np.ndarray, np.ndarray]:
        """The one place tokens are picked (structured output masks a copy of the logits here)."""
        assert req.logits is not None
        s = req.settings
        needs_history = s.repetition_penalty != 1.0 or s.bad_words_ids
        history = [req.prompt_ids + seq.generated for seq in req.sequences] if needs_history else []
        logits = req.logits
        if s.constraint is not None:  # structured output: mask a copy; logprobs stay the model's own
            logits, verdicts = constrain_logits(logits, [None if q.done else q.matcher for q in req.sequences])
            for seq, verdict in zip(req.sequences, verdicts):
                if verdict == "error":
                    seq.error = (f"the model's vocabulary cannot spell what the {s.constraint.kind} constraint "
                                 f"requires after {self._decode(seq.generated)[-40:]!r}")
                if verdict is not None:
                    seq.finish_reason = verdict
        tokens = next_tokens(logits, history, req.steps, s, req.rng)
        tokens = np.where([seq.done for seq in req.sequences], self._pad, tokens)
        return tokens, req.logits

    # ---- prompt lookup (n-gram speculation, exact for greedy) --------------------------------
    def _draft(self, req: _Request) -> list[int]:
        if req.rows != 1 or len(self._running) > 1 or self._waiting or self._prefilling:
            return []  # speculation pays off for a lone sequence; a shared batch decodes plainly
        if req.settings.constraint is not None:
            return []  # structured output: lookup is off for constrained rows
        seq = req.sequences[0]
        room = req.settings.max_new_tokens - len(seq.generated) - 1
        return prompt_lookup.draft(req.prompt_ids + seq.generated, min(req.settings.prompt_lookup, room))

    def _verify(self, req: _Request) -> list[tuple[np.ndarray, np.ndarray]]:
        assert req.logits is not None
        drafted, req.drafted = req.drafted, []
        history = req.prompt_ids + req.sequences[0].generated
        accepted = prompt_lookup.verify(req.logits[0], drafted, history, req.steps, req.settings, req.rng)
        self.batch.discard(len(drafted) + 1 - len(accepted))
        return accepted


def prefill_chunk(remaining: int, budget: int) -> int:
    """How many of a prompt's `remaining` tokens to prefill now, given a step's token `budget`:
    up to the budget, but never a lone token out of a longer prompt, before or after the chunk.
    ORT's GroupQueryAttention computes a single query token with its one-token (decode) kernel,
    whose sums differ in the last bits from its prompt kernel's (measured: 1.5e-6 in fp32, and
    int8/int4 activation rounding amplifies that to 0.03-0.06 logit), while every split into
    chunks of two or more tokens gives the whole prompt's bits. Without this rule a prompt's KV
    would depend on how the budget was split with the other requests joining in that step.
    The budget may be overrun by up to two tokens."""
    n = min(budget, remaining)
    if remaining > 1:
        n = max(n, 2)
        if remaining - n == 1:
            n += 1
    return n


def _needs_no_cache(req: _Request) -> bool:
    s = req.settings
    return s.prompt_logprobs is not None and s.max_new_tokens == 1 and req.rows == 1 and not s.prompt_lookup


def _token_ids(prompt: Sequence[int]) -> list[int]:
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise JaonnxError("a prompt must be a str or a list of token ids", "prompt") from None
    if not ids:
        raise JaonnxError("empty prompt: pass some text or token ids to continue", "prompt")
    return ids
