"""Running a job from an HTTP request: submit it to its model's worker, wait for its events
(with a deadline and an eye on the client), and stream them as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from ..errors import JaonnxError
from ..generation import GenerationResult
from .batcher import GenerationJob, Job, Piece, QueueFull, Worker
from .schemas import RequestError, error_body
from .validation import one_line


class ClientGone(Exception):
    """The client closed the connection: its work is cancelled and nobody reads the answer."""


def submit(worker: Worker, job: Job) -> asyncio.Queue[Any]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()
    job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
        worker.submit(job)
    except QueueFull as exc:
        raise RequestError(503, f"{exc}: retry later", None, "overloaded") from None
    return events


async def next_event(request: Any, events: asyncio.Queue[Any], deadline: float, timeout: float) -> tuple[str, Any]:
    """The job's next event; gives up at the deadline (504) or when the client goes away."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise RequestError(504, f"request timed out after {timeout:g} s", None, "timeout")
        try:
            kind, payload = await asyncio.wait_for(events.get(), min(left, 0.25))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None
            continue
        if kind == "error":
            if isinstance(payload, JaonnxError):
                raise RequestError(400, one_line(payload), payload.field)
            raise payload
        if kind == "cancelled":
            raise RequestError(503, "the server is shutting down: retry later", None, "overloaded")
        return kind, payload


async def run(request: Any, worker: Worker, job: Job, timeout: float) -> Any:
    events = submit(worker, job)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            kind, payload = await next_event(request, events, deadline, timeout)
            if kind == "result":
                return payload
    except ClientGone:
        from fastapi import Response

        return Response(status_code=499)
    finally:
        job.cancel()  # a no-op once finished; stops the work on timeout or disconnect


EventMaker = Callable[[str, Any], list[Any]]


def sse(request: Any, worker: Worker, job: GenerationJob, timeout: float, make: EventMaker) -> Any:
    """Stream the job's events; the job is cancelled however the stream ends."""
    from starlette.responses import StreamingResponse

    events = submit(worker, job)
    deadline = asyncio.get_running_loop().time() + timeout

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in make("start", job):
                yield data_line(chunk)
            while True:
                try:
                    kind, payload = await next_event(request, events, deadline, timeout)
                except RequestError as exc:
                    yield data_line(error_body(exc.message, exc.field, exc.kind, exc.status))
                    return
                for chunk in make(kind, payload):
                    yield data_line(chunk)
                if kind == "result":
                    yield b"data: [DONE]\n\n"
                    return
        except ClientGone:
            return
        except Exception as exc:  # a bug: end the stream with an error event, not a torn connection
            yield data_line(error_body(f"internal error: {type(exc).__name__}", None, "server_error", 500))
        finally:
            job.cancel()

    class Stream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                job.cancel()

    return Stream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def data_line(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def generate_body(name: str, results: list[GenerationResult]) -> dict[str, Any]:
    """`/v1/generate`'s response: each result as `GenerationResult.to_dict` gives it."""
    return {"model": name, "results": [r.to_dict() for r in results]}


def generate_events(model: str) -> EventMaker:
    """`/v1/generate`'s stream: one event per piece (with its tokens' logprobs when asked),
    then each row's finish and full result."""
    def make(kind: str, payload: Any) -> list[Any]:
        if kind == "piece":
            piece: Piece = payload
            event: dict[str, Any] = {"index": piece.row, "text": piece.text}
            if piece.logprobs is not None:
                event["logprobs"] = [asdict(lp) for lp in piece.logprobs]
            return [event]
        if kind == "result":
            results: list[GenerationResult] = payload
            return [{"index": i, "text": "", "finish_reason": r.finish_reason, "result": r.to_dict()}
                    for i, r in enumerate(results)]
        return []

    return make
