"""The HTTP API end to end on loopback: results equal the Python API's, streaming, the OpenAI
client, batching, bad input, overload, timeouts, disconnects, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import jaonnx
from serving_support import assert_json_error, free_port, need, running_server, same_predictions, sse_events

need("fastapi", "serve")

PROMPTS = ["近年の機械学習は", "東京は日本の", "今日は天気が良いので"]


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Any:
    with running_server(list(artifacts.values()), max_batch_size=8, max_wait_ms=20, request_timeout=60) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def models(artifacts: dict[str, Path]) -> dict[str, Any]:
    return {name: jaonnx.load(path) for name, path in artifacts.items()}


def masked(fm: Any, i: int = 0) -> str:
    return ["東京は日本の{}です。", "大学で{}の研究をしています。", "4年に1度{}は開かれる。"][i % 3].format(fm.mask_token)


def test_health_and_models(client: httpx.Client, artifacts: dict[str, Path]) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == set(artifacts)
    data = client.get("/v1/models").json()["data"]
    assert {m["id"]: m["task"] for m in data} == {
        "rinna-roberta": "fill-mask", "ken11-albert": "fill-mask", "jmedroberta": "fill-mask",
        "gpt2-small-ja": "text-generation", "rinna-gpt-1b": "text-generation",
    }


@pytest.mark.parametrize("name", ["rinna-roberta", "ken11-albert", "jmedroberta"])
def test_fill_mask_matches_python_api(client: httpx.Client, models: dict[str, Any], name: str) -> None:
    fm = models[name]
    one = client.post("/v1/fill-mask", json={"model": name, "inputs": masked(fm), "top_k": 3})
    assert one.status_code == 200, one.text
    assert one.json()["model"] == name
    same_predictions(one.json()["results"], fm(masked(fm), top_k=3))
    texts = [masked(fm, 0), masked(fm, 1), masked(fm, 2) + masked(fm, 0)]  # the last has two masks
    many = client.post("/v1/fill-mask", json={"model": name, "inputs": texts})
    assert many.status_code == 200, many.text
    same_predictions(many.json()["results"], fm(texts))


@pytest.mark.parametrize("name", ["gpt2-small-ja", "rinna-gpt-1b"])
def test_generate_greedy_matches_python_api(client: httpx.Client, models: dict[str, Any], name: str) -> None:
    want = models[name].generate(PROMPTS[:2], max_new_tokens=12, do_sample=False, return_ids=True)
    r = client.post("/v1/generate", json={"model": name, "prompt": PROMPTS[:2], "max_new_tokens": 12,
                                          "do_sample": False})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["generated_ids"] for g in got] == [w.generated_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]
    assert [g["finish_reason"] for g in got] == [w.finish_reason for w in want]


def test_generate_seeded_sampling_matches_python_api(client: httpx.Client, models: dict[str, Any]) -> None:
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=7,
                   num_return_sequences=2)
    want = models["gpt2-small-ja"].generate(PROMPTS[0], return_ids=True, **options)
    r = client.post("/v1/generate", json={"model": "gpt2-small-ja", "prompt": PROMPTS[0], **options})
    assert r.status_code == 200, r.text
    assert [g["generated_ids"] for g in r.json()["results"]] == [w.generated_ids for w in want]


def test_generate_stream_joins_to_the_text(client: httpx.Client, models: dict[str, Any]) -> None:
    want = models["gpt2-small-ja"].generate(PROMPTS[1], max_new_tokens=12, do_sample=False, return_ids=True)
    body = {"model": "gpt2-small-ja", "prompt": PROMPTS[1], "max_new_tokens": 12, "do_sample": False, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    pieces = [e["text"] for e in events[:-1] if "result" not in e]
    assert len(pieces) >= 2  # it really streamed
    assert "".join(pieces) == want.text
    assert events[-2]["result"]["generated_ids"] == want.generated_ids


def test_stop_sequences_cut_the_text(client: httpx.Client, models: dict[str, Any]) -> None:
    full = models["gpt2-small-ja"].generate(PROMPTS[0], max_new_tokens=16, do_sample=False)
    stop = full[len(full) // 2 : len(full) // 2 + 1]
    assert stop, full
    r = client.post("/v1/generate", json={"model": "gpt2-small-ja", "prompt": PROMPTS[0], "max_new_tokens": 16,
                                          "do_sample": False, "stop": stop})
    result = r.json()["results"][0]
    assert result["text"] == full[: full.index(stop)] and result["finish_reason"] == "stop"


def test_openai_client_completions(server: Any, models: dict[str, Any]) -> None:
    openai = need("openai", "dev")
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=60, max_retries=0)
    want = models["rinna-gpt-1b"].generate(PROMPTS[2], max_new_tokens=10, do_sample=False)
    done = client.completions.create(model="rinna-gpt-1b", prompt=PROMPTS[2], max_tokens=10, temperature=0, n=2)
    assert [c.text for c in done.choices] == [want, want]
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    stream = client.completions.create(model="rinna-gpt-1b", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with_usage = list(client.completions.create(model="rinna-gpt-1b", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, stop=[want[3:5]]))
    assert "".join(c.choices[0].text for c in with_usage if c.choices) == want[: want.index(want[3:5])]
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0
    echoed = client.completions.create(model="rinna-gpt-1b", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == PROMPTS[2] + want
    sampled = client.completions.create(model="rinna-gpt-1b", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=6,
                                        temperature=0.8, top_p=0.9, n=2, seed=3)
    assert len(sampled.choices) == 4 and [c.index for c in sampled.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="rinna-roberta", prompt="x", max_tokens=2)


def test_concurrent_requests_are_batched(server: Any, models: dict[str, Any]) -> None:
    url, app = server
    served = app.state.served
    fm, gen = models["ken11-albert"], models["gpt2-small-ja"]
    texts = [masked(fm, i) for i in range(12)]
    bodies = [("/v1/fill-mask", {"model": "ken11-albert", "inputs": t}) for t in texts] + [
        ("/v1/generate", {"model": "gpt2-small-ja", "prompt": PROMPTS[i % 3], "max_new_tokens": 8 + i % 5,
                          "do_sample": False}) for i in range(8)]
    with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: c.post(b[0], json=b[1]), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for t, r in zip(texts, responses):
        same_predictions(r.json()["results"], fm(t))
    for (_, body), r in zip(bodies[len(texts):], responses[len(texts):]):
        want = gen.generate(body["prompt"], max_new_tokens=body["max_new_tokens"], do_sample=False, return_ids=True)
        assert r.json()["results"][0]["generated_ids"] == want.generated_ids
    # batched: two concurrent requests shared one batch (fill-mask) or one decode step (generation),
    # not merely two rows (one request with two prompts has those)
    assert served["ken11-albert"].worker.stats.max_requests_seen > 1
    assert served["gpt2-small-ja"].worker.stats.max_requests_seen > 1


# ---- bad input ------------------------------------------------------------------------------------
BAD: list[tuple[str, Any, int, str | None]] = [
    ("/v1/fill-mask", b"{not json", 400, "body"),
    ("/v1/fill-mask", b"", 400, "body"),
    ("/v1/fill-mask", b'{"model": "rinna-roberta", "inputs": "\xff\xfe[MASK]"}', 400, "body"),
    ("/v1/fill-mask", b'{"model": "rinna-roberta", "inputs": "\\ud800[MASK]"}', 400, "inputs"),
    ("/v1/fill-mask", [1, 2], 422, "body"),
    ("/v1/fill-mask", {"inputs": "x[MASK]"}, 422, "model"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": 5}, 422, "inputs"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": ["a[MASK]", 5]}, 422, "inputs[1]"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "a[MASK]", "top_k": "3"}, 422, "top_k"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "a[MASK]", "top_k": 0}, 422, "top_k"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "a[MASK]", "top_k": True}, 422, "top_k"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "a[MASK]", "extra": 1}, 422, "extra"),
    ("/v1/fill-mask", {"model": "nope", "inputs": "a[MASK]"}, 404, "model"),
    ("/v1/fill-mask", {"model": "../rinna-roberta", "inputs": "a[MASK]"}, 404, "model"),
    ("/v1/fill-mask", {"model": "gpt2-small-ja", "inputs": "a[MASK]"}, 400, "model"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "マスクがない文"}, 400, "inputs"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": ["a[MASK]", "マスクがない"]}, 400, "inputs[1]"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "   "}, 400, "inputs"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": []}, 422, "inputs"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "長い文です。" * 400 + "[MASK]"}, 400, "inputs"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": ""}, 400, "prompt"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": ["ok", " "]}, 400, "prompt[1]"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "長い文です。" * 400}, 400, "prompt"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "max_new_tokens": 100000}, 400, "max_new_tokens"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "temperature": -1}, 422, "temperature"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "top_p": 0}, 422, "top_p"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "top_p": 1.5}, 422, "top_p"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "seed": -1}, 422, "seed"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "do_sample": False, "num_return_sequences": 2},
     400, "num_return_sequences"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "stream": "yes"}, 422, "stream"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": "東京", "stop": ["", "x"]}, 422, "stop"),
    ("/v1/generate", b'{"model": "gpt2-small-ja", "prompt": "x", "temperature": NaN}', 422, "temperature"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "max_tokens": -3}, 422, "max_tokens"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "temperature": 3}, 422, "temperature"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "n": 0}, 422, "n"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": [1, 2, 3]}, 422, "prompt[0]"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "stream": True, "max_tokens": 9999},
     400, "max_tokens"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京", "n": 9, "max_tokens": 2}, 413, "n"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": ["東京"] * 9, "max_new_tokens": 2, "do_sample": False},
     413, "prompt"),
    ("/v1/generate", {"model": "gpt2-small-ja", "prompt": ["東京"] * 3, "max_new_tokens": 2, "do_sample": True,
                      "num_return_sequences": 3}, 413, "num_return_sequences"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": "a[MASK]", "top_k": 101}, 422, "top_k"),
    ("/v1/fill-mask", {"model": "rinna-roberta", "inputs": ["[MASK]" * 20] * 3, "top_k": 100}, 413, "top_k"),
]


@pytest.mark.parametrize("path,body,status,field", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_4xx_naming_the_field(client: httpx.Client, path: str, body: Any, status: int,
                                                 field: str | None) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_json_error(r, status, field)


def test_over_large_body_and_unknown_routes(client: httpx.Client) -> None:
    big = json.dumps({"model": "rinna-roberta", "inputs": "あ" * (1 << 20) + "[MASK]"})
    assert_json_error(client.post("/v1/fill-mask", content=big), 413, "body")
    assert_json_error(client.get("/v1/fill-mask"), 405)
    assert_json_error(client.get("/v1/nothing-here"), 404)
    assert client.get("/health").status_code == 200  # still serving


# ---- overload, timeouts, disconnects, shutdown ------------------------------------------------------
def test_overload_answers_503_quickly_and_recovers(artifacts: dict[str, Path]) -> None:
    body = {"model": "gpt2-small-ja", "prompt": PROMPTS[0], "max_new_tokens": 16, "do_sample": False}
    with running_server([artifacts["gpt2-small-ja"]], max_batch_size=1, max_queue=1) as (url, app):
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)) as c:

            def call(_: int) -> tuple[int, float, httpx.Response]:
                start = time.monotonic()
                r = c.post("/v1/generate", json=body)
                return r.status_code, time.monotonic() - start, r

            with ThreadPoolExecutor(24) as pool:
                results = list(pool.map(call, range(24)))
            codes = [code for code, _, _ in results]
            assert set(codes) <= {200, 503} and codes.count(503) >= 10 and codes.count(200) >= 2, codes
            for code, seconds, r in results:
                if code == 503:
                    assert r.headers["retry-after"].isdigit()
                    assert_json_error(r, 503)
                    assert seconds < 2.0
            assert app.state.served["gpt2-small-ja"].worker.stats.rejected == codes.count(503)
            assert c.post("/v1/generate", json=body).status_code == 200  # recovered


def test_timeout_is_a_json_error_and_frees_the_worker(artifacts: dict[str, Path]) -> None:
    with running_server([artifacts["rinna-gpt-1b"]], request_timeout=0.3) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as c:
            # 1000 tokens: far more than the twin makes within the 0.3 s timeout, even on an idle box
            r = c.post("/v1/generate", json={"model": "rinna-gpt-1b", "prompt": "東京", "max_new_tokens": 1000,
                                             "do_sample": False, "min_new_tokens": 1000})
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
            stats = app.state.served["rinna-gpt-1b"].worker.stats
            wait_for(lambda: stats.cancelled == 1 and stats.active_rows == 0)
            ok = c.post("/v1/generate", json={"model": "rinna-gpt-1b", "prompt": "東京", "max_new_tokens": 4})
            assert ok.status_code == 200


def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(server: Any, stream: bool) -> None:
    url, app = server
    stats = app.state.served["rinna-gpt-1b"].worker.stats
    before = stats.cancelled
    # 1000 tokens: far more than the twin makes in the 0.3 s before the client hangs up, even on an idle box
    body = {"model": "rinna-gpt-1b", "prompt": "東京", "max_new_tokens": 1000, "min_new_tokens": 1000,
            "do_sample": False, "stream": stream}
    with httpx.Client(base_url=url, timeout=60) as c:
        if stream:
            with c.stream("POST", "/v1/generate", json=body) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first token arrived; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/generate", json=body, timeout=0.3)
    wait_for(lambda: stats.cancelled == before + 1 and stats.active_rows == 0)
    assert stats.tokens < 10_000


def test_graceful_shutdown_finishes_in_flight_requests(artifacts: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    code = ("import typer; from jaonnx.serving.command import serve; typer.run(serve)")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(artifacts["rinna-gpt-1b"]), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        body = {"model": "rinna-gpt-1b", "prompt": "東京", "max_new_tokens": 100, "min_new_tokens": 100,
                "do_sample": False}
        result: dict[str, Any] = {}
        request = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/generate", json=body,
                                                                               timeout=60)))
        request.start()
        wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["models"]["rinna-gpt-1b"]["active_rows"] > 0)
        proc.send_signal(signal.SIGTERM)
        request.join(60)
        r = result["r"]
        assert r.status_code == 200 and len(r.json()["results"][0]["generated_ids"]) == 100
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
