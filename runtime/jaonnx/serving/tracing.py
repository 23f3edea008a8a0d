"""Request tracing: an `X-Request-ID` on every response and, with `--log-format json`, one
JSON access-log line per request (id, route, model, status, latency, tokens).

Prompt text is logged only with `--log-prompts`; API keys and other headers never are. The
route handlers never see this module: the worker instrumentation (metrics.py) fills in the
model and token counts of the request in hand through `current()`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

HEADER = b"x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")  # what is safe to echo in a header and a log
LOGGER = "jaonnx.access"


@dataclass
class RequestInfo:
    """What one request did, filled in as it is served."""

    id: str
    method: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompts: list[str] | None = None

    def add_tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        self.completion_tokens = (self.completion_tokens or 0) + completion


_CURRENT: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("jaonnx_request", default=None)


def current() -> RequestInfo | None:
    """The request being served in this context (None outside a request)."""
    return _CURRENT.get()


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is a plain token of at most 128 characters, else a new one."""
    for key, value in headers:
        if key == HEADER:
            text = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def access_logger() -> logging.Logger:
    """`jaonnx.access`: bare JSON lines on stderr unless the embedding program configured it."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def log_record(info: RequestInfo, latency_s: float, log_prompts: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "request_id": info.id,
        "method": info.method, "route": info.route, "model": info.model, "status": info.status,
        "latency_ms": round(latency_s * 1000, 3), "prompt_tokens": info.prompt_tokens,
        "completion_tokens": info.completion_tokens,
    }
    if log_prompts and info.prompts is not None:
        record["prompts"] = info.prompts
    return record


class RequestTracing:
    """ASGI middleware, outermost: sets the request id and the `current()` request, tags the
    response, and writes the access-log line once the response is complete."""

    def __init__(self, app: Any, log_json: bool = False, log_prompts: bool = False) -> None:
        self.app = app
        self.log_json = log_json
        self.log_prompts = log_prompts
        self.logger = access_logger() if log_json else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(request_id(scope["headers"]), scope["method"], scope["path"])
        token = _CURRENT.set(info)
        tag = info.id.encode()

        async def traced(message: Any) -> None:
            if message["type"] == "http.response.start":
                info.status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message["headers"] = [*headers, (HEADER, tag)]
            await send(message)

        try:
            await self.app(scope, receive, traced)
        finally:
            _CURRENT.reset(token)
            if self.logger is not None:
                record = log_record(info, time.perf_counter() - info.started, self.log_prompts)
                self.logger.info(json.dumps(record, ensure_ascii=False))
