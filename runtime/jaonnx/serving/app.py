"""The HTTP app: `create_app([artifact, ...])` serves each artifact under its directory name.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/fill-mask`, `POST /v1/generate`, and
OpenAI's `POST /v1/completions`. Every request is read and validated here (size, UTF-8, JSON,
types, the model's own limits) before it reaches a model worker, so a bad request is always a
4xx JSON error naming its field and never costs the other clients anything.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` class of the routes)

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import JaonnxError, load
from .batcher import FillMaskJob, FillMaskWorker, GenerationJob, GenerationWorker, Job, QueueFull, Worker
from .operations import check_options, install as install_operations
from .scoring import echo_completion
from .schemas import (
    CompletionRequest,
    FillMaskRequest,
    GenerateRequest,
    RequestError,
    MAX_PREDICTIONS,
    parse,
    stops,
    texts,
)


@dataclass
class ServeConfig:
    """Batching and limits; the defaults suit a CPU box."""

    max_batch_size: int = 16  # fill-mask texts per batch; generation rows per decode step
    max_wait_ms: float = 5.0  # how long a fill-mask batch waits to fill up
    max_queue: int = 64  # requests waiting per model before 503
    request_timeout: float = 120.0  # seconds, queueing included
    max_body_bytes: int = 1 << 20
    retry_after: int = 1  # seconds, sent with 503
    threads: int | None = None  # ONNX Runtime intra-op threads per model (default: physical cores)
    spinning: bool = False  # idle ORT threads busy-wait: off, as several models share the cores
    # operations (serving-prod): see operations.py
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1/* (empty: no auth)
    metrics: bool = True  # /metrics and the instrumentation behind it
    metrics_auth: bool = False  # /metrics needs a key too
    log_format: str = "text"  # "json": one access-log line per request (jaonnx.access logger)
    log_prompts: bool = False  # json access logs include the prompt text


@dataclass
class ServedModel:
    name: str
    directory: Path
    model: Any
    worker: Worker

    @property
    def task(self) -> str:
        return str(self.model.task)


def load_models(artifact_dirs: Sequence[str | Path], config: ServeConfig, providers: Any = "auto") -> dict[str, ServedModel]:
    """Load every artifact once, at start: the served set never changes afterwards."""
    if not artifact_dirs:
        raise JaonnxError("give at least one artifact directory to serve")
    served: dict[str, ServedModel] = {}
    for path in artifact_dirs:
        directory = Path(path).resolve()
        name = directory.name
        if name in served:
            raise JaonnxError(f"two artifacts are named {name!r}: model names are directory names, rename one")
        model = load(directory, providers=providers, intra_op_threads=config.threads, spinning=config.spinning)
        worker: Worker
        if model.task == "fill-mask":
            worker = FillMaskWorker(name, model, config.max_queue, config.max_batch_size, config.max_wait_ms / 1000)
        else:
            worker = GenerationWorker(name, model, config.max_queue, config.max_batch_size)
        served[name] = ServedModel(name, directory, model, worker)
    return served


def error_body(message: str, field: str | None, kind: str, status: int) -> dict[str, Any]:
    """OpenAI's error shape (`message`, `type`, `param`, `code`) plus `field`."""
    return {"error": {"message": message, "type": kind, "field": field, "param": field, "code": status}}


class ClientGone(Exception):
    """The client closed the connection: its work is cancelled and nobody reads the answer."""


class PidHeader:
    """ASGI middleware: `x-jaonnx-pid` on every response, to see which replica answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pid = str(os.getpid()).encode()

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-jaonnx-pid", pid)]
            await send(message)

        await self.app(scope, receive, tagged)


def create_app(
    artifact_dirs: Sequence[str | Path], config: ServeConfig | None = None, providers: Any = "auto", **overrides: Any
) -> Any:
    """A FastAPI app serving the given artifacts; `overrides` are `ServeConfig` fields."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise JaonnxError(f"unknown serving option {key!r}")
        setattr(config, key, value)
    check_options(config)  # serving-prod
    served = load_models(artifact_dirs, config, providers)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        for m in served.values():  # uvicorn has already let in-flight requests finish
            await asyncio.to_thread(m.worker.stop)

    app = FastAPI(title="jaonnx", lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.served = served
    app.state.config = config
    app.add_middleware(PidHeader)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Any:
        headers = {"Retry-After": str(config.retry_after)} if exc.status == 503 else None
        return JSONResponse(error_body(exc.message, exc.field, exc.kind, exc.status), exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Any:
        return JSONResponse(error_body(str(exc.detail), None, "invalid_request_error", exc.status_code),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Any:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", None, "server_error", 500), 500)

    @app.get("/health")
    async def health() -> Any:
        return {
            "status": "ok",
            "pid": os.getpid(),
            "models": {
                m.name: {"task": m.task, "queued": m.worker.queued, **asdict(m.worker.stats)} for m in served.values()
            },
        }

    @app.get("/v1/models")
    async def models() -> Any:
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "jaonnx", "task": m.task,
             "recipe": m.model.manifest.recipe, "max_positions": m.model.manifest.max_positions,
             **({"mask_token": m.model.mask_token} if m.task == "fill-mask" else {})}
            for m in served.values()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/fill-mask")
    async def fill_mask(request: Request) -> Any:
        req = parse(FillMaskRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "fill-mask")
        items, single = texts(req.inputs, "inputs")
        await asyncio.to_thread(check_masked, m.model, items, single, req.top_k)
        results = await run(request, m, FillMaskJob(sink=_nowhere, texts=items, top_k=req.top_k), config)
        return {"model": m.name, "results": results[0] if single else results}

    @app.post("/v1/generate")
    async def generate(request: Request) -> Any:
        req = parse(GenerateRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        prompts, _ = texts(req.prompt, "prompt")
        options = req.model_dump(exclude_unset=True, exclude={"model", "prompt", "stream", "stop"})
        job = await asyncio.to_thread(prepare, m.model, prompts, options, {}, "prompt")
        check_rows(len(job.prompt_ids_rows), job.settings.num_return_sequences, config, "num_return_sequences")
        job.stream, job.stop = req.stream, stops(req.stop)
        if not req.stream:
            results = await run(request, m, job, config)
            return {"model": m.name, "results": results}
        return sse(request, m, job, config, generate_events(m.name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        prompts, _ = texts(req.prompt, "prompt")
        if req.max_tokens == 0:  # serving-prod: echo-only scoring (scoring.py)
            return await echo_completion(m, req, prompts, app.state.score_gates[m.name])
        openai_unsupported(req)
        n = req.n or 1
        greedy = req.temperature == 0 or req.top_p == 0
        options: dict[str, Any] = {
            "max_new_tokens": req.max_tokens or 16, "min_new_tokens": 0, "do_sample": not greedy,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": req.top_p or 1.0, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
            "num_return_sequences": 1 if greedy else n, "seed": req.seed,
        }
        rows = [p for p in prompts for _ in range(n)] if greedy else prompts  # greedy copies are identical
        aliases = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}
        job = await asyncio.to_thread(prepare, m.model, rows, options, aliases, "prompt")
        check_rows(len(job.prompt_ids_rows), n, config, "n")
        job.stream, job.stop = bool(req.stream), stops(req.stop)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": m.name}
        echo = bool(req.echo)
        if not req.stream:
            results = await run(request, m, job, config)
            return completion_body(meta, results, echo, n)
        usage = bool((req.stream_options or {}).get("include_usage"))
        return sse(request, m, job, config, completion_events(meta, echo, usage, n))

    install_operations(app, served, config)  # serving-prod: auth, metrics, tracing, /v1/score, playground
    return app


def _nowhere(_: Any) -> None:
    """Placeholder sink, replaced in `run` once the event loop is known."""


# ---- reading and checking requests -------------------------------------------------------------
async def read_json(request: Any, limit: int) -> Any:
    """The body as JSON, refusing over-large bodies early and anything not UTF-8."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"body is larger than {limit} bytes", "body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is larger than {limit} bytes", "body")
    if not body:
        raise RequestError(400, "empty body: send a JSON object", "body")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not valid UTF-8 (byte {exc.start})", "body") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"body is not valid JSON: {str(exc)[:120]}", "body") from None
    check_strings(data)
    return data


def check_strings(data: Any) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can take: refuse them."""
    stack: list[tuple[str, Any]] = [("body", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"{where} holds a lone surrogate, not valid Unicode text", where) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key if where == "body" else where
                stack.extend([(where, key), (name, item)])
        elif isinstance(value, list):
            stack.extend((where, item) for item in value)


def lookup(served: dict[str, ServedModel], name: str, task: str) -> ServedModel:
    if name not in served:
        raise RequestError(404, f"model {name[:80]!r} is not served here: GET /v1/models lists them", "model",
                           "not_found_error")
    m = served[name]
    if m.task != task:
        raise RequestError(400, f"model {name!r} is a {m.task} model, not {task}", "model")
    return m


def check_masked(model: Any, items: list[str], single: bool, top_k: int) -> None:
    masks = 0
    for i, text in enumerate(items):
        try:
            masks += len(model.encode(text)["mask_positions"])
        except JaonnxError as exc:
            raise RequestError(400, one_line(exc), "inputs" if single else f"inputs[{i}]") from None
    if masks * top_k > MAX_PREDICTIONS:
        raise RequestError(413, f"{masks} masks x top_k {top_k} = {masks * top_k} predictions; at most "
                                f"{MAX_PREDICTIONS} per request: lower top_k or split the request", "top_k")


def prepare(model: Any, prompts: list[str], options: dict[str, Any], aliases: dict[str, str], field: str) -> GenerationJob:
    """Tokenize and resolve the settings now, so that errors are a 400 before any streaming."""
    ids = []
    for i, prompt in enumerate(prompts):
        try:
            ids.append(model.encode(prompt))
        except JaonnxError as exc:
            raise RequestError(400, one_line(exc), field if len(prompts) == 1 else f"{field}[{i}]") from None
    longest = max(map(len, ids))
    try:
        settings = model.settings(longest, **options)
    except JaonnxError as exc:
        message = one_line(exc)
        name = message.split(" ", 1)[0]
        raise RequestError(400, message, aliases.get(name, name) if name in options else None) from None
    limit = model.manifest.max_positions
    if longest >= limit:
        raise RequestError(400, f"prompt is {longest} tokens but the model has {limit} positions: shorten it", field)
    if longest + settings.max_new_tokens > limit:
        name = aliases.get("max_new_tokens", "max_new_tokens")
        raise RequestError(
            400, f"prompt ({longest} tokens) + {name} ({settings.max_new_tokens}) exceeds the model's {limit} "
                 f"positions: lower {name} to {limit - longest} or less", name)
    return GenerationJob(sink=_nowhere, prompts=prompts, prompt_ids=ids, settings=settings)


def check_rows(rows: int, n: int, config: ServeConfig, n_field: str) -> None:
    """One request may fill the batch but not exceed it: that bounds the memory of a request."""
    if rows > config.max_batch_size:
        raise RequestError(413, f"{rows} sequences (prompts x {n_field}); this server runs at most "
                                f"{config.max_batch_size} per request: split the request",
                           n_field if n > 1 else "prompt")


def openai_unsupported(req: CompletionRequest) -> None:
    checks = [
        ("logprobs", req.logprobs not in (None, 0)), ("suffix", bool(req.suffix)),
        ("presence_penalty", bool(req.presence_penalty)), ("frequency_penalty", bool(req.frequency_penalty)),
        ("logit_bias", bool(req.logit_bias)), ("best_of", req.best_of not in (None, req.n or 1)),
    ]
    for name, bad in checks:
        if bad:
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name)


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# ---- running a job -------------------------------------------------------------------------------
def submit(m: ServedModel, job: Job) -> asyncio.Queue[Any]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()
    job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
        m.worker.submit(job)
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
                raise RequestError(400, one_line(payload))
            raise payload
        if kind == "cancelled":
            raise RequestError(503, "the server is shutting down: retry later", None, "overloaded")
        return kind, payload


async def run(request: Any, m: ServedModel, job: Job, config: ServeConfig) -> Any:
    events = submit(m, job)
    deadline = asyncio.get_running_loop().time() + config.request_timeout
    try:
        while True:
            kind, payload = await next_event(request, events, deadline, config.request_timeout)
            if kind == "result":
                return payload
    except ClientGone:
        from fastapi import Response

        return Response(status_code=499)
    finally:
        job.cancel()  # a no-op once finished; stops the work on timeout or disconnect


# ---- Server-Sent Events ----------------------------------------------------------------------------
EventMaker = Callable[[str, Any], list[Any]]


def sse(request: Any, m: ServedModel, job: GenerationJob, config: ServeConfig, make: EventMaker) -> Any:
    """Stream the job's events; the job is cancelled however the stream ends."""
    from starlette.responses import StreamingResponse

    events = submit(m, job)
    deadline = asyncio.get_running_loop().time() + config.request_timeout

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in make("start", job):
                yield data_line(chunk)
            while True:
                try:
                    kind, payload = await next_event(request, events, deadline, config.request_timeout)
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


def generate_events(model: str) -> EventMaker:
    def make(kind: str, payload: Any) -> list[Any]:
        if kind == "piece":
            row, text = payload
            return [{"index": row, "text": text}]
        if kind == "result":
            return [{"index": i, "text": "", "finish_reason": r["finish_reason"], "result": r}
                    for i, r in enumerate(payload)]
        return []

    return make


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def completion_body(meta: dict[str, Any], results: list[dict[str, Any]], echo: bool, n: int) -> dict[str, Any]:
    choices = [
        {"text": (r["prompt"] if echo else "") + r["text"], "index": i, "logprobs": None,
         "finish_reason": FINISH[r["finish_reason"]]}
        for i, r in enumerate(results)
    ]
    return {"object": "text_completion", **meta, "choices": choices, "usage": usage(results, n)}


def usage(results: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Token counts; each prompt counts once, however many choices (`n`) it has."""
    prompt_tokens = sum(len(r["prompt_ids"]) for r in results[::n])
    completion_tokens = sum(len(r["generated_ids"]) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_events(meta: dict[str, Any], echo: bool, include_usage: bool, n: int) -> EventMaker:
    def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {"object": "text_completion", **meta, "choices": choices, **extra}

    def choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def make(kind: str, payload: Any) -> list[Any]:
        if kind == "start":
            job: GenerationJob = payload
            per_prompt = len(job.prompt_ids_rows) // max(1, len(job.prompts))
            rows = range(len(job.prompt_ids_rows))
            return [chunk([choice(i, job.prompts[i // per_prompt])]) for i in rows] if echo else []
        if kind == "piece":
            row, text = payload
            return [chunk([choice(row, text)])]
        if kind == "result":
            out = [chunk([choice(i, "", FINISH[r["finish_reason"]])]) for i, r in enumerate(payload)]
            if include_usage:
                out.append(chunk([], usage=usage(payload, n)))
            return out
        return []

    return make
