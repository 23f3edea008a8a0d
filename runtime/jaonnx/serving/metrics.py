"""`/metrics` in Prometheus' text format, with prometheus-client, named as vLLM names its
metrics (`vllm:` -> `jaonnx:`, label `model_name`) plus the `http_*` series of
prometheus-fastapi-instrumentator (which vLLM also serves), so dashboards carry over.

Each app has its own registry. Worker state (queue depth, batch size) is read from the
workers' public `queued` and `stats` at scrape time; per-request timings and token counts
come from wrapping each job's event sink as it is submitted (`Metrics.instrument`), so the
batcher needs to know nothing about metrics.

Time to first token and time per output token are measured on every generation request: the
worker reports each job's first token (a "first_token" event), streamed or not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..generation import GenerationResult
from . import tracing
from .batcher import FillMaskResult

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)
TIMEOUT_MARK = b'"type": "timeout"'  # the error event of a stream that timed out


class Metrics:
    """The metrics of one app, over its served models."""

    def __init__(self, served: dict[str, Any]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.served = served
        self.registry = CollectorRegistry(auto_describe=True)
        r, model = self.registry, ["model_name"]
        self.ttft = Histogram("jaonnx:time_to_first_token_seconds", "Time to first token.",
                              model, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaonnx:time_per_output_token_seconds",
                              "Mean time per output token after the first.",
                              model, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("jaonnx:e2e_request_latency_seconds", "Model work of a request, queueing included.",
                             model, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("jaonnx:prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("jaonnx:generation_tokens", "Tokens generated.", model, registry=r)
        self.success = Counter("jaonnx:request_success", "Finished sequences (fill-mask: requests).",
                               [*model, "finished_reason"], registry=r)
        self.rejected = Counter("jaonnx:request_rejected", "Requests refused with 503: the model's queue was full.",
                                model, registry=r)
        self.timed_out = Counter("jaonnx:request_timeout", "Requests that ran past the request timeout (504).",
                                 model, registry=r)
        self.http_requests = Counter("http_requests", "HTTP requests by route and status.",
                                     ["method", "handler", "status"], registry=r)
        self.http_latency = Histogram("http_request_duration_seconds", "HTTP request latency, streaming included.",
                                      ["method", "handler"], buckets=LATENCY_BUCKETS, registry=r)
        self.app: Any = None  # set by operations.install: its route paths label requests refused before routing
        self._paths: set[str] | None = None
        self._in_flight: dict[str, int] = {name: 0 for name in served}
        self._lock = threading.Lock()
        r.register(_WorkerState(self))

    # ---- per job ------------------------------------------------------------------------------------
    def instrument(self, worker: Any) -> InstrumentedWorker:
        return InstrumentedWorker(worker, self)

    def running(self, name: str, queued: int) -> int:
        with self._lock:
            return max(0, self._in_flight.get(name, 0) - queued)

    def track_in_flight(self, name: str, delta: int) -> None:
        with self._lock:
            self._in_flight[name] = self._in_flight.get(name, 0) + delta

    def observe(self, name: str, job: Any, info: tracing.RequestInfo | None) -> Callable[[Any], None]:
        """A sink that records the job's metrics, then passes each event on to `job.sink`."""
        sink, started = job.sink, time.perf_counter()
        first: list[float] = []

        def observed(event: Any) -> None:
            kind, payload = event
            now = time.perf_counter()
            if kind in ("first_token", "piece") and not first:
                first.append(now)
                self.ttft.labels(name).observe(now - started)
            elif kind in ("result", "error", "cancelled"):
                self.track_in_flight(name, -1)
                if kind == "result":
                    self._finished(name, job, payload, now - started, now - first[0] if first else None, info)
            sink(event)

        return observed

    def _finished(self, name: str, job: Any, results: FillMaskResult | list[GenerationResult], seconds: float, after_first: float | None,
                  info: tracing.RequestInfo | None) -> None:
        self.e2e.labels(name).observe(seconds)
        if isinstance(results, FillMaskResult):
            self.success.labels(name, "stop").inc()
            return
        prompt = sum(len(p.ids) for p in job.inputs)
        generated = [0 if job.scoring else len(r.generated_ids) for r in results]  # scoring generates nothing
        self.prompt_tokens.labels(name).inc(prompt)
        self.generation_tokens.labels(name).inc(sum(generated))
        for r in results:
            self.success.labels(name, r.finish_reason).inc()
        if after_first is not None and max(generated, default=0) > 1:
            self.tpot.labels(name).observe(after_first / (max(generated) - 1))
        if info is not None:
            info.add_tokens(prompt, sum(generated))

    # ---- per HTTP request ----------------------------------------------------------------------------
    def http_done(self, method: str, handler: str, status: int, seconds: float, timed_out: bool) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_latency.labels(method, handler).observe(seconds)
        if status == 504 or timed_out:
            info = tracing.current()
            self.timed_out.labels(info.model if info and info.model else "").inc()

    def handler(self, scope: Any) -> str:
        """The route template that served the request, or its path if that is a route (a 401
        is sent before routing), else "unmatched": label values stay bounded."""
        route = getattr(scope.get("route"), "path", None)
        if route:
            return str(route)
        if self._paths is None and self.app is not None:
            self._paths = {r.path for r in self.app.routes if hasattr(r, "path")}
        return scope["path"] if scope["path"] in (self._paths or ()) else "unmatched"

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class InstrumentedWorker:
    """A worker as the routes see it: `submit` wraps the job's sink; the rest is the worker's."""

    def __init__(self, worker: Any, metrics: Metrics) -> None:
        self.worker = worker
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:  # queued, stats, stop, ...
        return getattr(self.worker, name)

    def submit(self, job: Any) -> None:
        from .batcher import QueueFull

        name = self.worker.name
        info = tracing.current()
        if info is not None:
            info.model = name
            info.prompts = list(job.texts) or None
        job.sink = self.metrics.observe(name, job, info)
        self.metrics.track_in_flight(name, +1)
        try:
            self.worker.submit(job)
        except QueueFull:
            self.metrics.track_in_flight(name, -1)
            self.metrics.rejected.labels(name).inc()
            raise
        except BaseException:
            self.metrics.track_in_flight(name, -1)
            raise


class _WorkerState:
    """Gauges read at scrape time: queue depth, running requests, running batch size."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        waiting = GaugeMetricFamily("jaonnx:num_requests_waiting", "Requests queued for a model.", labels=["model_name"])
        running = GaugeMetricFamily("jaonnx:num_requests_running", "Requests a model's worker has taken up.",
                                    labels=["model_name"])
        batch = GaugeMetricFamily("jaonnx:batch_current_size", "Sequences in the running generation batch.",
                                  labels=["model_name"])
        for name, m in self.metrics.served.items():
            queued = int(m.worker.queued)
            waiting.add_metric([name], queued)
            running.add_metric([name], self.metrics.running(name, queued))
            batch.add_metric([name], m.worker.stats.active_rows)
        yield from (waiting, running, batch)


class HttpMetrics:
    """ASGI middleware: requests by route template and status, and their latency."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, streaming, timed_out = [500], [False], [False]

        async def watched(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                streaming[0] = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and streaming[0] and TIMEOUT_MARK in message.get("body", b""):
                timed_out[0] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.metrics.http_done(scope["method"], self.metrics.handler(scope), status[0], time.perf_counter() - started, timed_out[0])


def metrics_router(metrics: Metrics) -> Any:
    """`GET /metrics`."""
    from fastapi import APIRouter, Response

    router = APIRouter()

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def scrape() -> Any:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return router
