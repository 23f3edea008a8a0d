"""The HTTP app: `create_app([artifact, ...])` serves each artifact under its directory name.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/fill-mask`, `POST /v1/generate`,
OpenAI's `POST /v1/completions`, and (in their own modules) `POST /v1/score` (scoring),
`POST /tokenize` and `/detokenize` (tokenize). This module is the app factory and the routes;
requests go through the model's input processor in `validation.prepare` (a bad request is a
4xx naming its field before it reaches a worker), are run and streamed by `events`, and their
typed results are shaped into JSON by `events` and `openai` only. Workers (`batcher`) own the
models: generation and scoring drive the runtime's `GenerationEngine`; nothing here decodes
or computes with a model.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` class of the routes)

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import JaonnxError, load
from .config import ServeConfig
from .batcher import FillMaskJob, FillMaskResult, FillMaskWorker, GenerationWorker, Worker
from .events import generate_body, generate_events, run, sse
from .operations import check_options, install as install_operations
from .openai import ALIASES, completion_body, completion_events
from .scoring import echo_completion
from .structured import completion_constraint
from .schemas import CompletionRequest, FillMaskRequest, GenerateRequest, RequestError, error_body, parse, stops, texts
from .tokenize import tokenize_router
from .validation import check_masked, check_rows, lookup, openai_unsupported, prepare, read_json


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

    config = (config or ServeConfig()).update(**overrides)
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
        job = FillMaskJob(sink=lambda _: None, inputs=items, top_k=req.top_k)
        result = await run(request, m.worker, job, config.request_timeout)
        if not isinstance(result, FillMaskResult):
            return result  # the client went away
        return {"model": m.name, "results": result.predictions[0] if single else result.predictions}

    @app.post("/v1/generate")
    async def generate(request: Request) -> Any:
        req = parse(GenerateRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        prompts, _ = texts(req.prompt, "prompt")
        options = req.model_dump(exclude_unset=True, exclude={"model", "prompt", "stream"})
        if "stop" in options:
            options["stop"] = stops(req.stop)
        job = await asyncio.to_thread(prepare, m.model, prompts, options, {}, req.stream)
        check_rows(job.rows, job.n, config.max_batch_size, "num_return_sequences")
        if not req.stream:
            results = await run(request, m.worker, job, config.request_timeout)
            if not isinstance(results, list):
                return results  # the client went away
            return generate_body(m.name, results)
        return sse(request, m.worker, job, config.request_timeout, generate_events(m.name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        prompts, _ = texts(req.prompt, "prompt")
        if req.max_tokens == 0:  # echo-only scoring (scoring.py)
            return await echo_completion(request, m, req, prompts, config)
        openai_unsupported(req)
        n = req.n or 1
        options = req.to_options()
        constraint, constraint_fields = completion_constraint(req)  # structured output
        options.update(constraint)
        rows = [p for p in prompts for _ in range(n)] if req.greedy else prompts  # greedy copies are identical
        job = await asyncio.to_thread(prepare, m.model, rows, options, {**ALIASES, **constraint_fields}, bool(req.stream))
        check_rows(job.rows, n, config.max_batch_size, "n")
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": m.name}
        echo = bool(req.echo)
        if not req.stream:
            results = await run(request, m.worker, job, config.request_timeout)
            if not isinstance(results, list):
                return results  # the client went away
            if req.logprobs is None:
                return completion_body(meta, results, echo, n)
            return await asyncio.to_thread(completion_body, meta, results, echo, n, m.model, req.logprobs)
        usage = bool((req.stream_options or {}).get("include_usage"))
        return sse(request, m.worker, job, config.request_timeout,
                   completion_events(meta, echo, usage, n, m.model, req.logprobs))

    app.include_router(tokenize_router(served, config))
    install_operations(app, served, config)  # serving-prod: auth, metrics, tracing, /v1/score, playground
    return app
