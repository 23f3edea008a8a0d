"""`/metrics`: scraped before and after known requests, every counter moved by exactly what
those requests did (tokens from the responses' own usage), the gauges see a running request,
and 503s and 504s are counted."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_support import need, running_server, sse_events

need("fastapi", "serve")
need("prometheus_client", "serve")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

GPT = "gpt2-small-ja"
NAMES = [
    "jaonnx:num_requests_running", "jaonnx:num_requests_waiting", "jaonnx:batch_current_size",
    "jaonnx:time_to_first_token_seconds", "jaonnx:time_per_output_token_seconds",
    "jaonnx:e2e_request_latency_seconds", "jaonnx:prompt_tokens", "jaonnx:generation_tokens",
    "jaonnx:request_success", "jaonnx:request_rejected", "jaonnx:request_timeout",
    "http_requests", "http_request_duration_seconds",
]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Any:
    with running_server([artifacts["rinna-roberta"], artifacts[GPT]], max_batch_size=8) as (url, app):
        yield url, app


def test_every_metric_is_exposed(server: Any) -> None:
    url, _ = server
    text = httpx.get(url + "/metrics").text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert set(NAMES) <= families, set(NAMES) - families
    at_rest = scrape(url)
    for name in ("jaonnx:num_requests_running", "jaonnx:num_requests_waiting", "jaonnx:batch_current_size"):
        assert value(at_rest, name, model_name=GPT) == 0 and (name, (("model_name", GPT),)) in at_rest


def test_counters_move_by_what_the_requests_did(server: Any) -> None:
    url, _ = server
    before = scrape(url)
    with httpx.Client(base_url=url, timeout=60) as c:
        plain = [c.post("/v1/completions", json={"model": GPT, "prompt": p, "max_tokens": 5, "temperature": 0}).json()
                 for p in ("東京は", "近年の機械学習は")]
        two = c.post("/v1/completions", json={"model": GPT, "prompt": "今日は", "max_tokens": 4, "n": 2,
                                               "temperature": 1.0, "seed": 3}).json()
        with c.stream("POST", "/v1/completions", json={"model": GPT, "prompt": "大学で", "max_tokens": 6,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
            streamed = sse_events(r)
        fm = c.post("/v1/fill-mask", json={"model": "rinna-roberta", "inputs": "東京は[MASK]です。"})
        missing = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert fm.status_code == 200 and missing.status_code == 404
    after = scrape(url)

    usages = [b["usage"] for b in (*plain, two)] + [streamed[-2]["usage"]]
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert delta(before, after, "jaonnx:prompt_tokens_total", model_name=GPT) == prompt
    assert delta(before, after, "jaonnx:generation_tokens_total", model_name=GPT) == generated
    reasons = [c["finish_reason"] for b in (*plain, two) for c in b["choices"]]
    reasons += [c["finish_reason"] for e in streamed[:-1] if isinstance(e, dict) for c in e["choices"] if c["finish_reason"]]
    finished = {"length": reasons.count("length"), "stop": reasons.count("stop")}
    assert sum(finished.values()) == 5
    for reason, count in finished.items():  # the API says "stop" for both eos and stop strings
        got = sum(delta(before, after, "jaonnx:request_success_total", model_name=GPT, finished_reason=r)
                  for r in (["eos", "stop"] if reason == "stop" else ["length"]))
        assert got == count, (reason, got, count)
    assert delta(before, after, "jaonnx:request_success_total", model_name="rinna-roberta", finished_reason="stop") == 1
    assert delta(before, after, "jaonnx:e2e_request_latency_seconds_count", model_name=GPT) == 4
    assert delta(before, after, "jaonnx:e2e_request_latency_seconds_count", model_name="rinna-roberta") == 1
    # every generation request, streamed or not, reports its first token; each made > 1 token
    assert delta(before, after, "jaonnx:time_to_first_token_seconds_count", model_name=GPT) == 4
    assert delta(before, after, "jaonnx:time_per_output_token_seconds_count", model_name=GPT) == sum(
        u["completion_tokens"] > 1 for u in usages)
    assert delta(before, after, "jaonnx:time_to_first_token_seconds_sum", model_name=GPT) > 0
    http = dict(method="POST", handler="/v1/completions")
    assert delta(before, after, "http_requests_total", **http, status="200") == 4
    assert delta(before, after, "http_requests_total", **http, status="404") == 1
    assert delta(before, after, "http_requests_total", method="POST", handler="/v1/fill-mask", status="200") == 1
    assert delta(before, after, "http_request_duration_seconds_count", **http) == 5
    assert delta(before, after, "http_requests_total", method="GET", handler="/metrics", status="200") == 1  # the first scrape
    httpx.get(url + "/no/such/route")
    assert delta(after, scrape(url), "http_requests_total", method="GET", handler="unmatched", status="404") == 1


class HeldWorker:
    """A worker whose jobs finish only when the test says so: the gauges' inputs, held still."""

    def __init__(self) -> None:
        from jaonnx.serving.batcher import WorkerStats

        self.name, self.queued, self.stats, self.jobs = GPT, 0, WorkerStats(), []

    def submit(self, job: Any) -> None:
        self.jobs.append(job)


def test_scoring_counts_prompt_tokens_and_generates_none(server: Any) -> None:
    """/v1/score runs on the engine (one token is made alongside): no generation tokens count."""
    url, _ = server
    before = scrape(url)
    r = httpx.post(url + "/v1/score", json={"model": GPT, "input": ["東京は日本の首都です。", "今日は晴れ。"]}, timeout=60)
    assert r.status_code == 200, r.text
    after = scrape(url)
    assert delta(before, after, "jaonnx:prompt_tokens_total", model_name=GPT) == r.json()["usage"]["prompt_tokens"]
    assert delta(before, after, "jaonnx:generation_tokens_total", model_name=GPT) == 0


def test_gauges_follow_the_workers() -> None:
    from types import SimpleNamespace

    from jaonnx.generation import GenerationResult, SamplingSettings
    from jaonnx.generation.inputs import ProcessedPrompt
    from jaonnx.serving.batcher import GenerationJob
    from jaonnx.serving.metrics import Metrics

    held = HeldWorker()
    metrics = Metrics({GPT: SimpleNamespace(worker=held)})
    worker = metrics.instrument(held)
    metrics.served[GPT].worker = worker

    def gauges() -> tuple[float, float, float]:
        text = metrics.exposition()[0].decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        return tuple(value(samples, n, model_name=GPT) for n in (  # type: ignore[return-value]
            "jaonnx:num_requests_running", "jaonnx:num_requests_waiting", "jaonnx:batch_current_size"))

    events: list[Any] = []
    inputs = [ProcessedPrompt("a", (1, 2), SamplingSettings(max_new_tokens=2))]
    jobs = [GenerationJob(sink=events.append, inputs=inputs) for _ in range(3)]
    for job in jobs:
        worker.submit(job)
    held.queued, held.stats.active_rows = 1, 4  # one still queued, two taken up with 4 rows
    assert gauges() == (2, 1, 4)
    held.jobs[0].sink(("result", [GenerationResult("a", "", [1, 2], [5, 6], "length")]))
    held.jobs[1].sink(("cancelled", None))
    held.queued, held.stats.active_rows = 0, 1
    assert gauges() == (1, 0, 1)
    assert [e[0] for e in events] == ["result", "cancelled"]  # the events still reach the route


def test_rejected_and_timed_out_requests_are_counted(artifacts: dict[str, Path]) -> None:
    body = {"model": GPT, "prompt": "東京は", "max_new_tokens": 16, "do_sample": False}
    with running_server([artifacts[GPT]], max_batch_size=1, max_queue=1) as (url, _):
        before = scrape(url)
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)) as c:
            with ThreadPoolExecutor(24) as pool:
                codes = list(pool.map(lambda _: c.post("/v1/generate", json=body).status_code, range(24)))
        after = scrape(url)
        assert codes.count(503) > 0, codes
        assert delta(before, after, "jaonnx:request_rejected_total", model_name=GPT) == codes.count(503)
        assert delta(before, after, "http_requests_total", method="POST", handler="/v1/generate",
                     status="503") == codes.count(503)
    big = "rinna-gpt-1b"  # the 24-layer twin: 1000 tokens take far longer than the timeout
    slow = {"model": big, "prompt": "東京", "max_new_tokens": 1000, "min_new_tokens": 1000, "do_sample": False}
    with running_server([artifacts[big]], request_timeout=0.2) as (url, _):
        before = scrape(url)
        assert httpx.post(url + "/v1/generate", json=slow, timeout=60).status_code == 504
        with httpx.stream("POST", url + "/v1/generate", json={**slow, "stream": True}, timeout=60) as r:
            events = sse_events(r)
        assert events[-1]["error"]["type"] == "timeout"
        after = scrape(url)
        assert delta(before, after, "jaonnx:request_timeout_total", model_name=big) == 2


def test_metrics_can_be_turned_off(artifacts: dict[str, Path]) -> None:
    with running_server([artifacts[GPT]], metrics=False) as (url, app):
        assert httpx.get(url + "/metrics").status_code == 404
        r = httpx.post(url + "/v1/completions", json={"model": GPT, "prompt": "東京は", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and app.state.metrics is None


def test_openapi_lists_every_route_with_its_schema(server: Any) -> None:
    url, app = server
    spec = httpx.get(url + "/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert served - {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect")} <= routes
    for path, fields in {"/v1/fill-mask": {"model", "inputs", "top_k"}, "/v1/generate": {"prompt", "max_new_tokens"},
                         "/v1/completions": {"prompt", "max_tokens", "echo", "logprobs"},
                         "/v1/score": {"model", "input", "top_logprobs"}}.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert fields <= set(schema["properties"]), path
    assert "swagger" in httpx.get(url + "/docs").text.lower()
