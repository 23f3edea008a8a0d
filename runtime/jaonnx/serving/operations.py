"""What a production deployment adds around the routes, in one call from `create_app`:
API keys, request ids and access logs, Prometheus metrics, scoring, the playground, and the
request schemas in `/docs`. Each piece lives in its own module; this only wires them."""

from __future__ import annotations

from typing import Any

from ..errors import JaonnxError
from .auth import ApiKeyAuth
from .metrics import HttpMetrics, Metrics, metrics_router
from .playground import playground_router
from .schemas import CompletionRequest, FillMaskRequest, GenerateRequest
from .scoring import score_router
from .tokenize import DetokenizeRequest, TokenizeRequest
from .tracing import RequestTracing

LOG_FORMATS = ("text", "json")
REQUEST_BODIES = {"/v1/fill-mask": FillMaskRequest, "/v1/generate": GenerateRequest,
                  "/v1/completions": CompletionRequest, "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def check_options(config: Any) -> None:
    """Refuse bad operations options before any model is loaded."""
    if config.log_format not in LOG_FORMATS:
        raise JaonnxError(f"log format {config.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    for key in config.api_keys:
        if not isinstance(key, str) or not key.strip():
            raise JaonnxError("an API key is empty: give non-empty keys")
    if config.metrics_auth and not config.api_keys:
        raise JaonnxError("--metrics-auth needs an API key: set --api-key or JAONNX_API_KEY")


def install(app: Any, served: dict[str, Any], config: Any) -> None:
    """Instrument the workers and add the middleware and routes. Call after the routes are defined."""
    metrics = Metrics(served) if config.metrics else None
    if metrics is not None:
        for m in served.values():
            m.worker = metrics.instrument(m.worker)
    app.state.metrics = metrics
    app.include_router(score_router(served, config))
    if metrics is not None:
        app.include_router(metrics_router(metrics))
        metrics.app = app
    app.include_router(playground_router())
    for route in app.routes:
        body = REQUEST_BODIES.get(getattr(route, "path", None))
        if body is not None:
            route.openapi_extra = {"requestBody": {"required": True, "content": {
                "application/json": {"schema": body.model_json_schema()}}}}
    # add_middleware wraps what is there: the last added runs first
    app.add_middleware(ApiKeyAuth, keys=tuple(k.strip() for k in config.api_keys), protect_metrics=config.metrics_auth)
    if metrics is not None:
        app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(RequestTracing, log_json=config.log_format == "json", log_prompts=config.log_prompts)
