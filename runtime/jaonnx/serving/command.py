"""`jaonnx serve`: registered in cli.py with `app.command()(serve)`. fastapi, uvicorn and ray
are imported inside, so the rest of the CLI works without the `serve` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..artifact import read_manifest
from ..errors import JaonnxError
from ..generation.engine import DEFAULT_PREFILL_TOKENS
from ..generation.prefix_cache import DEFAULT_MB


def _need(module: str, extra: str = "serve") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise JaonnxError(f"serving needs {module}: pip install 'jaonnx[{extra}]'")


def serve(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories; each is served under its directory name.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Fill-mask texts per batch; generation rows per decode step.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a fill-mask batch waits to fill up.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting per model before 503 + Retry-After.")] = 64,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds, queueing included.")] = 120.0,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    providers: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads per model (default: physical cores).")] = None,
    spin: Annotated[bool, typer.Option("--spin/--no-spin", help="Let idle ORT threads busy-wait (faster alone, worse when models share cores).")] = False,
    max_prefill_tokens: Annotated[int, typer.Option(help="Prompt tokens prefilled per decode step, so a long prompt never stalls the running streams (0: whole prompts at once).")] = DEFAULT_PREFILL_TOKENS,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Reuse the KV of prompt prefixes already computed (automatic prefix caching).")] = True,
    prefix_cache_mb: Annotated[float, typer.Option(help="Host memory the prefix cache may hold per model, in MiB (least recently used blocks go first).")] = DEFAULT_MB,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve instead of one uvicorn process.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (e.g. auto); default: start one.")] = None,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (without autoscaling).")] = 1,
    min_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling lower bound (turns autoscaling on).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling upper bound (turns autoscaling on).")] = None,
    replica_cpus: Annotated[float, typer.Option(help="CPUs Ray reserves per replica.")] = 1.0,
    # serving-prod: operations options (auth.py, metrics.py, tracing.py)
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*; repeat for several keys (also JAONNX_API_KEY, comma-separated).")] = None,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Serve Prometheus metrics on /metrics.")] = True,
    metrics_auth: Annotated[bool, typer.Option("--metrics-auth", help="Require an API key on /metrics too.")] = False,
    log_format: Annotated[str, typer.Option(help="text (uvicorn's access log) | json (one JSON line per request, no prompt text).")] = "text",
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Put the prompt text in JSON access logs.")] = False,
) -> None:
    """Serve ARTIFACTS over HTTP: /v1/fill-mask, /v1/generate and OpenAI's /v1/completions."""
    for path in artifacts:
        read_manifest(path)  # a one-line error for anything that is not a complete artifact
    options = dict(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                   request_timeout=timeout, max_body_bytes=max_body_bytes, threads=threads, spinning=spin,
                   max_prefill_tokens=max_prefill_tokens or None, prefix_cache=prefix_cache,
                   prefix_cache_mb=prefix_cache_mb)
    # serving-prod: keys, metrics auth and access logs
    from types import SimpleNamespace

    _need("fastapi")  # operations imports pydantic
    if metrics:
        _need("prometheus_client")
    from .auth import api_keys, bind_warning
    from .operations import check_options

    keys = api_keys(api_key or ())
    options.update(api_keys=keys, metrics=metrics, metrics_auth=metrics_auth, log_format=log_format, log_prompts=log_prompts)
    check_options(SimpleNamespace(**options))  # before Ray or uvicorn start
    warning = bind_warning(host, keys)
    if warning:
        typer.echo(warning, err=True)
    if ray:
        _need("ray", "serve,ray")
        from .ray_serve import autoscaling_config, run

        autoscaling = None
        if min_replicas is not None or max_replicas is not None:
            low = min_replicas if min_replicas is not None else 1
            autoscaling = autoscaling_config(low, max_replicas if max_replicas is not None else max(low, replicas))
        run(artifacts, host=host, port=port, address=ray_address, num_replicas=replicas, autoscaling=autoscaling,
            num_cpus=replica_cpus, providers=providers, **options)
        return
    _need("fastapi")
    _need("uvicorn")
    import uvicorn

    from .app import create_app

    app = create_app(artifacts, providers=providers, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(timeout, 1.0),
                access_log=log_format == "text")  # serving-prod: json mode writes its own access lines
