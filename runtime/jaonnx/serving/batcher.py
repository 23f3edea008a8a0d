"""Model workers: one thread owns one model, so calls into it are serialized (the task
objects are not thread-safe), and that thread is where requests are batched.

* `FillMaskWorker` batches concurrent fill-mask requests dynamically: it takes the first
  waiting request, waits at most `max_wait_s` for more, up to `max_batch` texts, and runs
  them as one padded batch.
* `GenerationWorker` does continuous batching: every decode step runs all active rows as one
  batch; a request joins the batch between steps (after its own prefill) and leaves it as
  soon as it is finished or cancelled, so short requests never wait for long ones.

Queues are bounded: `submit` raises `QueueFull` instead of piling work up. Results go back
through a `sink` callback (called from the worker thread), which the HTTP layer turns into
asyncio events; the workers know nothing about HTTP or asyncio.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..generation import GenerationResult, RequestOutput, ResultCollector, TokenLogprob
from ..generation.inputs import ProcessedPrompt
from .invariance import InvarianceWarning

Event = tuple[str, Any]
# ("result", list[GenerationResult] | FillMaskResult) | ("piece", Piece) | ("first_token", None)
# | ("error", exc) | ("cancelled", None): typed payloads only; JSON is made by the response modules
Sink = Callable[[Event], None]


class QueueFull(Exception):
    """The model's queue is full: the caller should retry later (HTTP 503 + Retry-After)."""


@dataclass
class Job:
    """One request's work. `cancel()` is safe to call from any thread."""

    sink: Sink
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def texts(self) -> list[str]:
        """The request's input texts (for access logs)."""
        raise NotImplementedError


@dataclass
class FillMaskJob(Job):
    inputs: list[str] = field(default_factory=list)
    top_k: int = 5

    @property
    def texts(self) -> list[str]:
        return self.inputs


@dataclass(frozen=True)
class FillMaskResult:
    """A fill-mask job's answer: per input text, the `FillMask` model's typed predictions
    (`fill_mask.Prediction`s; a list of them per mask when a text has several)."""

    predictions: list[Any]


@dataclass
class GenerationJob(Job):
    """One engine request per processed prompt (ids, text and its own settings, resolved by
    the model's input processor, as `TextGenerator.generate` does); rows are prompt-major."""

    inputs: list[ProcessedPrompt] = field(default_factory=list)
    stream: bool = False
    scoring: bool = False  # only the prompts' log-probabilities are wanted (the one token made is not)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.inputs]

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [list(p.ids) for p in self.inputs]

    @property
    def n(self) -> int:
        return self.inputs[0].settings.num_return_sequences if self.inputs else 1

    @property
    def rows(self) -> int:
        return len(self.inputs) * self.n


@dataclass(frozen=True)
class Piece:
    """What one row of a streamed job produced in one step: its new text (possibly empty
    while a character or a stop string is held back), new token ids, their log-probabilities
    when asked for, and (on the row's first piece) the prompt's log-probabilities."""

    row: int
    text: str
    token_ids: list[int]
    context_ids: list[int]  # prompt + the tokens generated before these
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class WorkerStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    batches: int = 0
    max_batch_seen: int = 0  # rows (fill-mask: texts) in one batch
    max_requests_seen: int = 0  # distinct requests (jobs) that shared one step or batch
    active_rows: int = 0
    tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the engine's prefix cache
    prefix_cache_hits: int = 0  # of those, tokens whose KV was reused
    prefix_cache_bytes: int = 0  # host memory the prefix cache holds now


class Worker:
    """A daemon thread with a bounded queue in front of one model."""

    def __init__(self, name: str, model: Any, max_queue: int) -> None:
        self.name = name
        self.model = model
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max(1, max_queue))
        self.stats = WorkerStats()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"jaonnx-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise QueueFull(f"model {self.name!r} is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            raise QueueFull(f"model {self.name!r} has {self.queue.maxsize} requests waiting") from None
        self.stats.submitted += 1

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the work in hand; whatever is still queued then is cancelled."""
        self._stopping.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            _send(job, ("cancelled", None))

    def _main(self) -> None:
        while not self._stopping.is_set() or self._busy():
            try:
                self._iterate()
            except Exception as exc:  # a bug must fail the requests in hand, never the thread
                self._fail_all(exc)

    def _take(self, timeout: float) -> Job | None:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _busy(self) -> bool:
        return False

    def _iterate(self) -> None:
        raise NotImplementedError

    def _fail_all(self, exc: Exception) -> None:
        raise NotImplementedError


def _send(job: Job, event: Event) -> None:
    try:
        job.sink(event)
    except Exception:  # the receiver went away (its event loop closed): nothing to tell
        pass


class FillMaskWorker(Worker):
    """Dynamic batching: up to `max_batch` texts, waiting at most `max_wait_s` to fill up."""

    def __init__(self, name: str, model: Any, max_queue: int, max_batch: int = 16, max_wait_s: float = 0.005) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._in_hand: list[FillMaskJob] = []
        super().__init__(name, model, max_queue)

    def _iterate(self) -> None:
        first = self._take(0.1)
        if first is None:
            return
        batch: list[FillMaskJob] = [first]  # type: ignore[list-item]
        rows = len(first.texts)
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            job = self._take(deadline - time.monotonic())
            if job is None:
                break
            batch.append(job)  # type: ignore[arg-type]
            rows += len(job.texts)
        self._in_hand = batch
        self._run(batch)
        self._in_hand = []

    def _run(self, batch: list[FillMaskJob]) -> None:
        live = []
        for job in batch:
            if job.cancelled:
                self.stats.cancelled += 1
                _send(job, ("cancelled", None))
            else:
                live.append(job)
        by_top_k: dict[int, list[FillMaskJob]] = {}
        for job in live:
            by_top_k.setdefault(job.top_k, []).append(job)
        for top_k, jobs in by_top_k.items():
            texts = [t for job in jobs for t in job.texts]
            try:
                results = self.model(texts, top_k=top_k, batch_size=self.max_batch)
            except Exception as exc:
                for job in jobs:
                    self.stats.failed += 1
                    _send(job, ("error", exc))
                continue
            self.stats.batches += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(texts))
            self.stats.max_requests_seen = max(self.stats.max_requests_seen, len(jobs))
            start = 0
            for job in jobs:
                self.stats.completed += 1
                _send(job, ("result", FillMaskResult(results[start : start + len(job.texts)])))
                start += len(job.texts)

    def _fail_all(self, exc: Exception) -> None:
        for job in self._in_hand:
            self.stats.failed += 1
            _send(job, ("error", exc))
        self._in_hand = []


class GenerationWorker(Worker):
    """Continuous batching: the thread feeds jobs to a `GenerationEngine` and drains its
    `step()` outputs into each job's sink. All decoding, the KV cache and per-request state
    live in the engine; this class only queues, admits and routes.

    A job with several prompts is one engine request per prompt; its rows are prompt-major
    (row = prompt * n + sequence). A job joins only when all its rows fit the batch, and the
    job behind it waits (FIFO), so the bounded queue in front of the worker stays meaningful.
    """

    def __init__(self, name: str, model: Any, max_queue: int, max_batch: int = 16,
                 engine_options: dict[str, Any] | None = None) -> None:
        self.max_batch = max(1, max_batch)
        self.engine_options = dict(engine_options or {})  # max_prefill_tokens, prefix_cache, prefix_cache_mb
        self.engine = model.engine(max_batch_size=self.max_batch, **self.engine_options)
        self._invariance = InvarianceWarning(name, model.manifest)
        self._live: list[_Live] = []
        self._by_request: dict[str, _Live] = {}  # engine request id -> its job: outputs are routed by id
        self._waiting: GenerationJob | None = None
        super().__init__(name, model, max_queue)

    def _busy(self) -> bool:
        return bool(self._live) or self._waiting is not None or not self.queue.empty()

    def _iterate(self) -> None:
        self._admit()
        self._drop_cancelled()
        self.stats.active_rows = self.engine.num_running_rows
        if not self.engine.has_unfinished_requests():
            return
        before = self.engine.tokens_generated
        cache = self.engine.prefix_cache
        looked, hit = (cache.queries, cache.hits) if cache else (0, 0)
        outputs = self.engine.step()
        if cache:
            self.stats.prefix_cache_queries += cache.queries - looked
            self.stats.prefix_cache_hits += cache.hits - hit
            self.stats.prefix_cache_bytes = cache.bytes
        self.stats.batches += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, self.engine.last_step_rows)
        self._invariance.batched(self.engine.last_step_rows)
        self.stats.tokens += self.engine.tokens_generated - before
        stepped = {id(self._by_request[out.request_id]) for out in outputs}
        self.stats.max_requests_seen = max(self.stats.max_requests_seen, len(stepped))
        for out in outputs:
            self._by_request[out.request_id].take(out)
        for live in [x for x in self._live if x.collector.done]:
            self._finish(live)
        self.stats.active_rows = self.engine.num_running_rows

    def _admit(self) -> None:
        while True:
            job = self._waiting
            self._waiting = None
            if job is None:
                job = self._take(0 if self._live else 0.1)  # type: ignore[assignment]
            if job is None:
                return
            if job.cancelled:
                self.stats.cancelled += 1
                _send(job, ("cancelled", None))
                continue
            rows = sum(live.rows for live in self._live)
            if self._live and rows + job.rows > self.max_batch:
                self._waiting = job  # joins when rows free up; FIFO order is kept
                return
            ids: list[str] = []
            try:
                for p in job.inputs:
                    ids.append(self.engine.add_request(p))
            except Exception as exc:
                for rid in ids:
                    self.engine.abort_request(rid)
                self.stats.failed += 1
                _send(job, ("error", exc))
                continue
            live = _Live(job, ResultCollector(job.texts, ids, job.n))
            self._live.append(live)
            self._by_request.update({rid: live for rid in ids})

    def _drop_cancelled(self) -> None:
        for live in [x for x in self._live if x.job.cancelled]:
            self._abort(live)
            self._forget(live)
            self.stats.cancelled += 1
            _send(live.job, ("cancelled", None))

    def _forget(self, live: _Live) -> None:
        self._live.remove(live)
        for rid in live.collector.request_ids:
            self._by_request.pop(rid, None)

    def _finish(self, live: _Live) -> None:
        self._forget(live)
        self.stats.completed += 1
        _send(live.job, ("result", live.collector.results()))

    def _abort(self, live: _Live) -> None:
        for rid in live.collector.request_ids:
            self.engine.abort_request(rid)

    def _fail_all(self, exc: Exception) -> None:
        jobs = [live.job for live in self._live] + ([self._waiting] if self._waiting else [])
        for live in self._live:
            self._abort(live)
        self._live, self._by_request, self._waiting = [], {}, None
        self.engine = self.model.engine(max_batch_size=self.max_batch, **self.engine_options)  # a clean batch after a bug
        for job in jobs:
            self.stats.failed += 1
            _send(job, ("error", exc))


@dataclass
class _Live:
    """A job whose requests are in the engine, and what its rows have produced so far."""

    job: GenerationJob
    collector: ResultCollector
    started: bool = False

    @property
    def rows(self) -> int:
        return self.job.rows

    def take(self, out: RequestOutput) -> None:
        if not self.started:  # time to first token, streamed or not (metrics)
            self.started = True
            _send(self.job, ("first_token", None))
        row = self.collector.take(out)
        if self.job.stream and (out.new_text or out.logprobs or out.prompt_logprobs is not None):
            context = list(out.prompt_ids) + out.token_ids[: len(out.token_ids) - len(out.new_token_ids)]
            _send(self.job, ("piece", Piece(row, out.new_text, list(out.new_token_ids), context, out.logprobs,
                                            out.prompt_logprobs)))
