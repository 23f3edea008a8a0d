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

import numpy as np

from ..generation.decoder import DecoderSession
from ..generation.generator import left_padded
from ..generation.sampling import SamplingSettings, next_tokens
from ..generation.streaming import REPLACEMENT, continuation_text

Event = tuple[str, Any]  # ("result", payload) | ("piece", (row, text)) | ("error", exc) | ("cancelled", None)
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


@dataclass
class FillMaskJob(Job):
    texts: list[str] = field(default_factory=list)
    top_k: int = 5


@dataclass
class GenerationJob(Job):
    """Rows = prompts x num_return_sequences, all sharing `settings` and one RNG, exactly as
    one `TextGenerator.generate` call would run them."""

    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    settings: SamplingSettings | None = None
    stream: bool = False
    stop: tuple[str, ...] = ()

    @property
    def prompt_ids_rows(self) -> list[list[int]]:
        n = self.settings.num_return_sequences if self.settings else 1
        return [ids for ids in self.prompt_ids for _ in range(n)]


@dataclass
class WorkerStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    batches: int = 0
    max_batch_seen: int = 0
    active_rows: int = 0
    tokens: int = 0


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
        rows = len(first.texts)  # type: ignore[attr-defined]
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            job = self._take(deadline - time.monotonic())
            if job is None:
                break
            batch.append(job)  # type: ignore[arg-type]
            rows += len(job.texts)  # type: ignore[attr-defined]
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
            start = 0
            for job in jobs:
                self.stats.completed += 1
                _send(job, ("result", results[start : start + len(job.texts)]))
                start += len(job.texts)

    def _fail_all(self, exc: Exception) -> None:
        for job in self._in_hand:
            self.stats.failed += 1
            _send(job, ("error", exc))
        self._in_hand = []


@dataclass
class _Active:
    """A generation job in the running batch; its rows are contiguous in the batch."""

    job: GenerationJob
    settings: SamplingSettings
    rng: np.random.Generator
    history: list[list[int]]
    generated: list[list[int]]
    reasons: list[str]
    done: np.ndarray
    emitted: list[str]
    logits: np.ndarray | None = None
    step: int = 0

    @property
    def rows(self) -> int:
        return len(self.history)


class GenerationWorker(Worker):
    """Continuous batching of generation requests, one decode step at a time.

    The running batch keeps one KV cache (ONNX Runtime values, left-padded, masked) for all
    rows. A new request is prefilled on its own, then its cache is merged in; finished rows
    are sliced out, and all-padding columns on the left are trimmed. Every step, each job
    picks its tokens with its own settings and RNG, so greedy results (and seeded sampling)
    match what the request gives alone, up to floating-point noise from padding.
    """

    def __init__(self, name: str, model: Any, max_queue: int, max_batch: int = 16) -> None:
        self.max_batch = max(1, max_batch)
        self.active: list[_Active] = []
        self._waiting: GenerationJob | None = None
        self._decoder = DecoderSession(model.session, model.manifest)
        self._pad = int(model.pad_id)
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._positions = np.zeros(0, dtype=np.int64)
        self._last = np.zeros(0, dtype=np.int64)
        super().__init__(name, model, max_queue)

    def _busy(self) -> bool:
        return bool(self.active) or self._waiting is not None or not self.queue.empty()

    # ---- one scheduling round ----------------------------------------------------------------
    def _iterate(self) -> None:
        self._admit()
        if not self.active:
            return
        self._sample()
        self._retire()
        if self.active:
            self._decode()

    def _admit(self) -> None:
        rows = sum(a.rows for a in self.active)
        while True:
            job = self._waiting
            self._waiting = None
            if job is None:
                job = self._take(0 if self.active else 0.1)  # type: ignore[assignment]
            if job is None:
                return
            if job.cancelled:
                self.stats.cancelled += 1
                _send(job, ("cancelled", None))
                continue
            need = len(job.prompt_ids) * job.settings.num_return_sequences  # type: ignore[union-attr]
            if self.active and rows + need > self.max_batch:
                self._waiting = job  # joins when rows free up; FIFO order is kept
                return
            try:
                self._prefill(job)
            except Exception as exc:
                self.stats.failed += 1
                _send(job, ("error", exc))
                continue
            rows += need

    def _prefill(self, job: GenerationJob) -> None:
        settings = job.settings
        assert settings is not None
        prompts = job.prompt_ids_rows
        rows = len(prompts)
        ids, mask, positions = left_padded(prompts, self._pad)
        main_past = self._decoder.past
        try:
            self._decoder.reset(rows)
            logits = self._decoder.forward(ids, mask, positions, keep=1)[:, -1]
            job_past = self._decoder.past
        finally:
            self._decoder.past = main_past
        self._merge(job_past, mask, positions[:, -1] + 1)
        self.active.append(
            _Active(
                job=job, settings=settings, rng=np.random.default_rng(settings.seed),
                history=[list(p) for p in prompts], generated=[[] for _ in prompts],
                reasons=["length"] * rows, done=np.zeros(rows, dtype=bool), emitted=[""] * rows, logits=logits,
            )
        )

    # ---- the KV cache: merge, slice, trim ------------------------------------------------------
    def _merge(self, past: list[Any], mask: np.ndarray, next_positions: np.ndarray) -> None:
        if not self.active:
            self._decoder.past, self._mask, self._positions = past, mask, next_positions
            self._last = np.full(len(mask), self._pad, dtype=np.int64)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old = [_left_pad(v.numpy(), width) for v in self._decoder.past]
        new = [_left_pad(v.numpy(), width) for v in past]
        self._decoder.past = [self._value(np.concatenate([a, b])) for a, b in zip(old, new)]
        self._mask = np.concatenate([_left_pad(self._mask, width, axis=1), _left_pad(mask, width, axis=1)])
        self._positions = np.concatenate([self._positions, next_positions])
        self._last = np.concatenate([self._last, np.full(len(mask), self._pad, dtype=np.int64)])

    def _value(self, array: np.ndarray) -> Any:
        return self._decoder._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._decoder.device, 0)

    def _keep_rows(self, keep: np.ndarray) -> None:
        mask = self._mask[keep]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if len(used) else mask.shape[1]
        self._mask = mask[:, start:]
        self._positions, self._last = self._positions[keep], self._last[keep]
        self._decoder.past = [self._value(v.numpy()[keep][:, :, start:]) for v in self._decoder.past]

    # ---- sampling, finishing, decoding ------------------------------------------------------------
    def _sample(self) -> None:
        row = 0
        for a in self.active:
            span = slice(row, row + a.rows)
            row += a.rows
            if a.job.cancelled:
                continue
            s = a.settings
            tokens = np.where(a.done, self._pad, next_tokens(a.logits, a.history, a.step, s, a.rng))
            a.logits = None
            for i in np.flatnonzero(~a.done):
                token = int(tokens[i])
                a.generated[i].append(token)
                a.history[i].append(token)
                self.stats.tokens += 1
                if token == s.eos_token_id:
                    a.done[i] = True
                    a.reasons[i] = "eos"
            self._last[span] = tokens
            a.step += 1
            if a.job.stop or a.job.stream:
                self._texts(a, final=False)

    def _texts(self, a: _Active, final: bool) -> list[str]:
        """Each row's text so far, cut at a stop string; streams the part that is final."""
        stop = a.job.stop
        hold = max(map(len, stop), default=1) - 1
        texts = []
        for i, (prompt, gen) in enumerate(zip(a.job.prompt_ids_rows, a.generated)):
            text = continuation_text(self.model._decode, prompt, gen)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                if not a.done[i]:
                    a.done[i] = True
                    a.reasons[i] = "stop"
            texts.append(text)
            if not a.job.stream:
                continue
            finished = final or bool(a.done[i])
            ready = text if finished or cut >= 0 else text[: len(text) - hold] if hold else text
            if not finished and ready.endswith(REPLACEMENT):
                continue
            if ready.startswith(a.emitted[i]) and len(ready) > len(a.emitted[i]):
                _send(a.job, ("piece", (i, ready[len(a.emitted[i]) :])))
                a.emitted[i] = ready
        return texts

    def _retire(self) -> None:
        keep: list[int] = []
        still: list[_Active] = []
        row = 0
        for a in self.active:
            span = list(range(row, row + a.rows))
            row += a.rows
            if a.job.cancelled:
                self.stats.cancelled += 1
                _send(a.job, ("cancelled", None))
            elif a.done.all() or a.step >= a.settings.max_new_tokens:
                self._finish(a)
            else:
                keep.extend(span)
                still.append(a)
        if len(still) != len(self.active):
            self.active = still
            if still:
                self._keep_rows(np.array(keep, dtype=np.int64))
        self.stats.active_rows = sum(a.rows for a in self.active)

    def _finish(self, a: _Active) -> None:
        texts = self._texts(a, final=True)
        rows = a.job.prompt_ids_rows
        n = a.settings.num_return_sequences
        results = [
            {"prompt": a.job.prompts[i // n], "text": text, "prompt_ids": list(p), "generated_ids": g, "finish_reason": r}
            for i, (text, p, g, r) in enumerate(zip(texts, rows, a.generated, a.reasons))
        ]
        self.stats.completed += 1
        _send(a.job, ("result", results))

    def _decode(self) -> None:
        rows = len(self._last)
        self.stats.batches += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, rows)
        self._mask = np.concatenate([self._mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        logits = self._decoder.forward(self._last[:, None], self._mask, self._positions[:, None], keep=1)[:, -1]
        self._positions = self._positions + 1
        row = 0
        for a in self.active:
            a.logits = logits[row : row + a.rows]
            row += a.rows

    def _fail_all(self, exc: Exception) -> None:
        jobs = [a.job for a in self.active] + ([self._waiting] if self._waiting else [])
        self.active, self._waiting = [], None
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._positions = self._last = np.zeros(0, dtype=np.int64)
        for job in jobs:
            self.stats.failed += 1
            _send(job, ("error", exc))


def _left_pad(array: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)
