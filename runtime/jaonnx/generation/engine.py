"""GenerationEngine: continuous batching as a library object (after vLLM's `LLMEngine`).

    engine = gen.engine(max_batch_size=16)
    rid = engine.add_request("近年の機械学習は", max_new_tokens=32, do_sample=False)
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.index, out.new_text, out.finished)

Every `step()` runs one decode forward for all running rows, prefills the requests that fit,
samples one token per row with each request's own settings and RNG, and returns what each
sequence produced. A request joins the batch between steps and leaves it as soon as it is
finished or aborted. `TextGenerator.generate`/`stream` and the HTTP server all drive this one
loop; the engine owns the KV cache (through a `BatchDecoder`) and all per-request state.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import JaonnxError
from .batch import BatchDecoder
from .inputs import ProcessedPrompt
from .constraints import Constraints, RowMatcher, constrain_logits
from ..numeric import log_softmax
from .sampling import SamplingSettings, next_tokens
from .streaming import IncrementalText

Decode = Callable[[list[int]], str]


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling processors) and
    the `top` most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one sequence of a request produced in one `step()`.

    A request with `num_return_sequences = n` has n sequences, told apart by `index`
    (0..n-1); each reports its own `finished`. `new_text` is stream-safe: text that could
    still change (an incomplete character, a possible stop string) is held back until final.
    `token_ids` and `text` are everything generated so far (text cut at a stop string).
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" once finished
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # for new_token_ids, when the request asked
    # prompt_ids[1:] scored given the tokens before each (settings.prompt_logprobs); on a
    # sequence's first output only
    prompt_logprobs: list[TokenLogprob] | None = None
    # Structured output, once finished: "satisfied", "incomplete" (it ran out of tokens or hit a
    # stop string first) or "failed" (the vocabulary cannot spell what must come next: `error`).
    constraint: str | None = None
    error: str | None = None


@dataclass
class _Sequence:
    detok: IncrementalText
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the text so far, cut at a stop string
    emitted: str = ""  # the part of it already reported as final
    finish_reason: str | None = None
    matcher: RowMatcher | None = None  # structured output
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    settings: SamplingSettings
    rng: np.random.Generator
    prompt_text: str
    sequences: list[_Sequence]
    steps: int = 0
    logits: np.ndarray | None = None  # [n, vocab] or, after a speculative block, [n, k, vocab]
    drafted: list[int] = field(default_factory=list)  # tokens under verification (prompt lookup)
    prompt_logprobs: list[TokenLogprob] | None = None  # computed at admission, sent with the first output

    @property
    def rows(self) -> int:
        return len(self.sequences)

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.sequences)


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
        vocab_limit: int | None = None,
        constraints: Constraints | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise JaonnxError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}", "max_batch_size")
        self.batch = batch
        self.max_batch_size = max_batch_size
        self._decode = decode
        self._encode = encode
        self._resolve = resolve
        self._pad = pad_id
        self._vocab_limit = vocab_limit  # ids from here on are embedding padding the tokenizer lacks
        self._constraints = constraints
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self.tokens_generated = 0  # over the engine's life, for throughput figures
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
        sequences = [_Sequence(IncrementalText(self._decode, prompt_ids)) for _ in range(settings.num_return_sequences)]
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
        for req in self._running:
            if req.request_id == request_id:
                self._running_keep([r for r in self._running if r is not req])
                return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running_rows(self) -> int:
        return sum(r.rows for r in self._running)

    @property
    def num_waiting_requests(self) -> int:
        return len(self._waiting)

    def _find(self, request_id: str) -> _Request | None:
        return next((r for r in itertools.chain(self._waiting, self._running) if r.request_id == request_id), None)

    # ---- one iteration ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One decode forward for the running rows, prefill of the requests that fit, one
        sampled token (or a verified speculative block) per row. Returns each sequence's news."""
        self._forward()
        scored = self._score_only()
        self._admit()
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
        self._mask_padding(logits)
        row = 0
        for req in self._running:
            req.logits = logits[row : row + req.rows]
            row += req.rows

    def _admit(self) -> None:
        """Prefill, in one batch, the waiting requests that fit (first come, first served)."""
        if any(r.drafted for r in self._running):
            return  # a speculative block is being verified: join on the next step
        rows, joining = self.num_running_rows, []
        while self._waiting and rows + self._waiting[0].rows <= self.max_batch_size:
            joining.append(self._waiting.popleft())
            rows += joining[-1].rows
        if not joining:
            return
        prompts = [req.prompt_ids for req in joining for _ in range(req.rows)]
        reserve = max(len(req.prompt_ids) + req.settings.max_new_tokens for req in joining)
        logits = self.batch.add(prompts, reserve)
        self._mask_padding(logits)
        for req in joining:
            if req.settings.prompt_logprobs is not None:
                req.prompt_logprobs = self._prompt_logprobs(req)
        start = 0
        for req in joining:
            req.logits = logits[start : start + req.rows]
            start += req.rows
        self._running.extend(joining)

    def _score_only(self) -> list[_Request]:
        """Take the waiting requests at the head of the queue that need no KV cache: they want
        their prompt's log-probabilities and a single token (scoring). One full-sequence
        forward gives both, outside the running batch, and they finish in this step."""
        done: list[_Request] = []
        while self._waiting and _needs_no_cache(self._waiting[0]):
            req = self._waiting.popleft()
            logits = self.batch.logits(req.prompt_ids)
            self._mask_padding(logits)
            req.prompt_logprobs = prompt_logprobs(logits[:-1], req.prompt_ids[1:], req.settings.prompt_logprobs or 0)
            req.logits = logits[-1:]
            done.append(req)
        return done

    def _prompt_logprobs(self, req: _Request) -> list[TokenLogprob]:
        """Each prompt token after the first, scored given the ones before (vLLM's
        `prompt_logprobs`), from one full-sequence forward that leaves the batch as it was."""
        ids = req.prompt_ids
        if len(ids) < 2:
            return []
        logits = self.batch.logits(ids)[: len(ids) - 1]
        self._mask_padding(logits)
        return prompt_logprobs(logits, ids[1:], req.settings.prompt_logprobs or 0)

    def _mask_padding(self, logits: np.ndarray) -> None:
        """An embedding table padded past the tokenizer: those ids are never picked."""
        if self._vocab_limit is not None and logits.shape[-1] > self._vocab_limit:
            logits[..., self._vocab_limit :] = -np.inf

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
        new_logprobs: list[list[TokenLogprob]] = [[] for _ in req.sequences]
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
                    new_logprobs[i].append(_logprob(logits[i], token, s.logprobs))
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
        outputs = []
        for i, seq in enumerate(req.sequences):
            if not new[i] and not (seq.done and not was_done[i]):
                continue
            piece = self._update_text(req, seq, new[i])
            first = len(seq.generated) == len(new[i])
            outputs.append(
                RequestOutput(
                    req.request_id, i, new[i], piece, seq.done, seq.finish_reason, req.prompt_text, req.prompt_ids,
                    list(seq.generated), seq.text, new_logprobs[i] if s.logprobs is not None else None,
                    req.prompt_logprobs if first else None, *_constraint_state(seq),
                )
            )
        return outputs

    def _sample(self, req: _Request) -> tuple[np.ndarray, np.ndarray]:
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

    def _update_text(self, req: _Request, seq: _Sequence, new: list[int]) -> str:
        """Extend the sequence's text by its new tokens (cut at a stop string) and return the
        part that is now final."""
        if seq.finish_reason == "stop" and not new:
            return ""
        seq.detok.push(new)
        if seq.done:
            seq.detok.finish()
        stops = req.settings.stop
        text = seq.detok.text
        if stops:
            look = max(0, len(seq.text) - max(map(len, stops)))  # a stop may straddle the old end
            cut = min((i for i in (text.find(s, look) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                if not seq.done:
                    seq.finish_reason = "stop"
        seq.text = text
        if seq.done:
            ready = text
        else:
            hold = max(map(len, stops), default=1) - 1  # a stop string may be starting
            ready = text[: len(text) - hold] if hold else text
        if not ready.startswith(seq.emitted) or len(ready) <= len(seq.emitted):
            return ""
        piece, seq.emitted = ready[len(seq.emitted) :], ready
        return piece

    # ---- prompt lookup (n-gram speculation, exact for greedy) --------------------------------
    def _draft(self, req: _Request) -> list[int]:
        """Up to `prompt_lookup` tokens that followed the latest earlier occurrence of the
        sequence's last n-gram (n = 3, 2, 1) in prompt + generated text."""
        if req.rows != 1 or len(self._running) > 1 or self._waiting:
            return []  # speculation pays off for a lone sequence; a shared batch decodes plainly
        if req.settings.constraint is not None:
            return []  # structured output: lookup is off for constrained rows
        seq = req.sequences[0]
        room = req.settings.max_new_tokens - len(seq.generated) - 1
        limit = min(req.settings.prompt_lookup, room)
        if limit <= 0:
            return []
        context = req.prompt_ids + seq.generated
        for n in (3, 2, 1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + limit]
                    if follow:
                        return follow
        return []

    def _verify(self, req: _Request) -> list[tuple[np.ndarray, np.ndarray]]:
        """Greedy-check a drafted block verified in one forward: keep the drafted tokens the
        model itself would pick, plus the model's own token after the last one kept; drop
        the cache positions of the rejected ones."""
        assert req.logits is not None
        block = req.logits[0]  # [1 + drafted, vocab]
        drafted, req.drafted = req.drafted, []
        seq = req.sequences[0]
        accepted: list[tuple[np.ndarray, np.ndarray]] = []
        history = req.prompt_ids + seq.generated
        for j in range(len(drafted) + 1):
            logits = block[j : j + 1]
            token = next_tokens(logits, [history], req.steps + j, req.settings, req.rng)
            accepted.append((token, logits))
            history = history + [int(token[0])]
            if j == len(drafted) or int(token[0]) != drafted[j] or int(token[0]) == req.settings.eos_token_id:
                break
        self.batch.discard(len(drafted) + 1 - len(accepted))
        return accepted


def _needs_no_cache(req: _Request) -> bool:
    s = req.settings
    return s.prompt_logprobs is not None and s.max_new_tokens == 1 and req.rows == 1 and not s.prompt_lookup


def _constraint_state(seq: _Sequence) -> tuple[str | None, str | None]:
    """RequestOutput's (constraint, error) for a sequence: set once a constrained one is done."""
    if seq.matcher is None or not seq.done:
        return None, None
    if seq.error is not None:
        return "failed", seq.error
    cut = seq.finish_reason == "stop" and seq.matcher.satisfied and not seq.matcher.stopped
    return ("satisfied" if seq.matcher.satisfied and not cut else "incomplete"), None


def _token_ids(prompt: Sequence[int]) -> list[int]:
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise JaonnxError("a prompt must be a str or a list of token ids", "prompt") from None
    if not ids:
        raise JaonnxError("empty prompt: pass some text or token ids to continue", "prompt")
    return ids


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(np.asarray(logits, dtype=np.float64).reshape(-1))
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return TokenLogprob(token, float(lp[token]), [(int(t), float(lp[t])) for t in best])


def prompt_logprobs(logits: np.ndarray, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """`TokenLogprob`s of `targets` under logits [len(targets), vocab] (row i predicts
    targets[i]), each with the `top` likeliest alternatives, most likely first."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64))
    rows = np.arange(len(targets))
    chosen = lp[rows, np.asarray(targets, dtype=np.int64)]
    if not top:
        return [TokenLogprob(int(t), float(v)) for t, v in zip(targets, chosen)]
    part = np.argpartition(-lp, top - 1, axis=-1)[:, :top]
    order = np.argsort(-np.take_along_axis(lp, part, axis=-1), axis=-1, kind="stable")
    best = np.take_along_axis(part, order, axis=-1)
    return [TokenLogprob(int(t), float(chosen[i]), [(int(b), float(lp[i, b])) for b in best[i]])
            for i, t in enumerate(targets)]
