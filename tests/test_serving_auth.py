"""API keys: every /v1/* route needs `Authorization: Bearer KEY` when keys are set; /health
and (by default) /metrics stay open; a wrong key is a 401 in the server's error shape; keys
are never logged; JSON access logs carry the request id but no prompt text by default."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_support import assert_json_error, free_port, need, running_server, sse_events

need("fastapi", "serve")
need("prometheus_client", "serve")

from jaonnx import JaonnxError  # noqa: E402
from jaonnx.serving.auth import api_keys, bind_warning  # noqa: E402

KEYS = ("key-one-1234", "key-two-5678")
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/fill-mask", {"model": "rinna-roberta", "inputs": "東京は[MASK]です。", "top_k": 2}),
    ("POST", "/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京は", "max_new_tokens": 2, "do_sample": False}),
    ("POST", "/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 2, "temperature": 0}),
    ("POST", "/v1/score", {"model": "gpt2-small-ja", "input": "東京は日本の首都です。"}),
]


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Any:
    with running_server([artifacts["rinna-roberta"], artifacts["gpt2-small-ja"]], api_keys=KEYS) as (url, app):
        yield url, app


def call(url: str, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_v1_route_needs_a_key(server: Any, method: str, path: str, body: Any) -> None:
    url, _ = server
    missing = call(url, method, path, body, {})
    error = assert_json_error(missing, 401)
    assert error["type"] == "authentication_error" and "missing" in error["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    for wrong in ("Bearer key-one-123", "Bearer key-one-12345", "Basic key-one-1234", "key-one-1234", "Bearer"):
        error = assert_json_error(call(url, method, path, body, {"Authorization": wrong}), 401)
        assert "key-one" not in error["message"]  # the key sent is never echoed
    for key in KEYS:  # several keys, each works
        ok = call(url, method, path, body, {"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text[:300]


def test_health_metrics_docs_and_playground_stay_open(server: Any) -> None:
    url, _ = server
    for path in ("/health", "/metrics", "/openapi.json", "/", "/static/app.js"):
        assert httpx.get(url + path).status_code == 200, path
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 200, path
    assert httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()["status"] == "ok"


def test_metrics_auth_protects_metrics(artifacts: dict[str, Path]) -> None:
    with running_server([artifacts["rinna-roberta"]], api_keys=KEYS[:1], metrics_auth=True) as (url, _):
        assert_json_error(httpx.get(url + "/metrics"), 401)
        scraped = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert scraped.status_code == 200 and "jaonnx:num_requests_waiting" in scraped.text
        assert httpx.get(url + "/health").status_code == 200


def test_without_keys_nothing_is_required(artifacts: dict[str, Path]) -> None:
    with running_server([artifacts["rinna-roberta"]]) as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 200


def test_keys_from_options_and_environment() -> None:
    assert api_keys(["a1"], {"JAONNX_API_KEY": "b2, c3,,"}) == ("a1", "b2", "c3")
    assert api_keys([], {}) == ()
    assert api_keys(["a1", "a1"], {"JAONNX_API_KEY": "a1"}) == ("a1",)
    with pytest.raises(JaonnxError, match="empty"):
        api_keys([""], {})
    with pytest.raises(JaonnxError, match="whitespace"):
        api_keys(["a b"], {})
    with pytest.raises(JaonnxError, match="empty"):
        running_server_options_check(api_keys=(" ",))
    with pytest.raises(JaonnxError, match="log format"):
        running_server_options_check(log_format="xml")
    with pytest.raises(JaonnxError, match="metrics-auth needs an API key"):
        running_server_options_check(metrics_auth=True)


def running_server_options_check(**options: Any) -> None:
    from jaonnx.serving.app import ServeConfig
    from jaonnx.serving.operations import check_options

    check_options(ServeConfig(**options))


def test_bind_warning() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert bind_warning(host, ()) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        warning = bind_warning(host, ())
        assert warning is not None and warning.startswith("warning:") and "\n" not in warning
        assert bind_warning(host, ("k",)) is None


def jaonnx_cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "jaonnx", *args]


def cli_env(**extra: str) -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "runtime"), str(root / "export"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_cli_refuses_an_empty_key_and_a_bad_log_format(artifacts: dict[str, Path]) -> None:
    art = str(artifacts["rinna-roberta"])
    for args in (["--api-key", ""], ["--log-format", "xml"], ["--metrics-auth"]):
        done = subprocess.run(jaonnx_cli("serve", art, *args), capture_output=True, text=True,
                              env=cli_env(JAONNX_API_KEY=""), timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


def serve_and_wait(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(jaonnx_cli("serve", *args, "--port", str(port)), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    return err


def test_cli_json_access_log_has_ids_and_no_key_or_prompt(artifacts: dict[str, Path]) -> None:
    """`jaonnx serve --log-format json` with a key from the environment: one JSON line per
    request, with its id, route, model, status, latency and tokens; neither key nor prompt."""
    port, secret, prompt = free_port(), "s3cret-key-abcdef", "秘密の文章はここに"
    proc = serve_and_wait([str(artifacts["gpt2-small-ja"]), "--log-format", "json"], port,
                          cli_env(JAONNX_API_KEY=secret))
    try:
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {secret}"}
        r = httpx.post(base + "/v1/completions", headers={**auth, "X-Request-ID": "trace-42"}, timeout=60,
                       json={"model": "gpt2-small-ja", "prompt": prompt, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        usage = r.json()["usage"]
        denied = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer not-the-key"})
        assert denied.status_code == 401 and len(denied.headers["x-request-id"]) == 32
    finally:
        err = stop(proc)
    assert secret not in err and prompt not in err and "not-the-key" not in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    by_id = {rec["request_id"]: rec for rec in records}
    done = by_id["trace-42"]
    assert done["route"] == "/v1/completions" and done["method"] == "POST" and done["status"] == 200
    assert done["model"] == "gpt2-small-ja" and done["latency_ms"] > 0 and "prompts" not in done
    assert done["prompt_tokens"] == usage["prompt_tokens"] and done["completion_tokens"] == usage["completion_tokens"]
    assert by_id[denied.headers["x-request-id"]]["status"] == 401
    assert not any(line.startswith("INFO:") and '"POST /v1' in line for line in err.splitlines())  # no text log too


def test_cli_warns_when_exposed_without_a_key(artifacts: dict[str, Path]) -> None:
    port = free_port()
    proc = serve_and_wait([str(artifacts["rinna-roberta"]), "--host", "0.0.0.0"], port, cli_env(JAONNX_API_KEY=""))
    err = stop(proc)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "without an API key" in warnings[0]


def test_log_prompts_puts_the_prompt_in_the_log(artifacts: dict[str, Path]) -> None:
    records: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(record.getMessage()))

    logger = logging.getLogger("jaonnx.access")
    keep = Keep()
    logger.addHandler(keep)
    try:
        dirs = [artifacts["rinna-roberta"], artifacts["gpt2-small-ja"]]
        with running_server(dirs, log_format="json", log_prompts=True) as (url, _):
            text = "東京は日本の[MASK]です。"
            r = httpx.post(url + "/v1/fill-mask", json={"model": "rinna-roberta", "inputs": text})
            assert r.status_code == 200
            body = {"model": "gpt2-small-ja", "prompt": ["東京は", "大学で"], "max_tokens": 3, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as streamed:
                usage = sse_events(streamed)[-2]["usage"]
    finally:
        logger.removeHandler(keep)
    rec = next(rec for rec in records if rec["route"] == "/v1/fill-mask")
    assert rec["prompts"] == [text] and rec["model"] == "rinna-roberta" and rec["request_id"] == r.headers["x-request-id"]
    rec = next(rec for rec in records if rec["request_id"] == streamed.headers["x-request-id"])
    assert rec["prompts"] == body["prompt"] and rec["status"] == 200
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_request_ids_are_echoed_only_when_safe(server: Any) -> None:
    url, _ = server
    assert httpx.get(url + "/health", headers={"X-Request-ID": "abc.DEF-123"}).headers["x-request-id"] == "abc.DEF-123"
    for bad in ("has space", "x" * 129, "semi;colon"):
        got = httpx.get(url + "/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert got != bad and len(got) == 32
    seen = {httpx.get(url + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(seen) == 3
