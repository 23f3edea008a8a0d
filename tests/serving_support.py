"""Helpers for the serving tests: a real uvicorn server on a free loopback port, in a thread,
always shut down; and small HTTP/SSE helpers."""

from __future__ import annotations

import importlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest


def need(module: str, extra: str) -> Any:
    """The module, or a skip where it is not installed (under CI=true that skip fails the run:
    tests/ci_skips.py does not list it, so CI can never pass without the serving tests)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is missing: pip install 'jaonnx[{extra}]'", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(artifact_dirs: list[Path], **options: Any) -> Iterator[tuple[str, Any]]:
    """(base URL, app) of `create_app(artifact_dirs, **options)` served by uvicorn in a thread."""
    import uvicorn

    from jaonnx.serving import create_app

    app = create_app(artifact_dirs, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not shut down"


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of a Server-Sent Events response, `[DONE]` as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_json_error(response: httpx.Response, status: int | None = None, field: str | None = None) -> dict[str, Any]:
    """A JSON error `{"error": {"message", "field", ...}}` with `status` (default: any 4xx)."""
    if status is None:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    else:
        assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "\n" not in error["message"]
    if field is not None:
        assert error["field"] == field, error
    return error


def same_predictions(got: Any, want: Any, tol: float = 1e-4) -> None:
    """Fill-mask results equal: tokens and texts exactly, scores up to float noise from padding."""
    if isinstance(want, dict):
        assert {k: got[k] for k in ("token", "token_str", "sequence")} == {
            k: want[k] for k in ("token", "token_str", "sequence")}
        assert abs(got["score"] - want["score"]) <= tol
        return
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        same_predictions(g, w, tol)
