"""`jaonnx serve`: registered in cli.py with `app.command()(serve)`. fastapi, uvicorn and ray
are imported inside, so the rest of the CLI works without the `serve` extra.

The command's options are the `ServeConfig` fields (config.py) plus where and how to run;
its signature is built from both, so a serving setting is spelled once."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..artifact import read_manifest
from ..errors import JaonnxError
from .config import ServeConfig, cli_parameters


def _need(module: str, extra: str = "serve") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise JaonnxError(f"serving needs {module}: pip install 'jaonnx[{extra}]'")


def run_serve(
    artifacts: list[Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    providers: str = "auto",
    log_level: str = "info",
    ray: bool = False,
    ray_address: str | None = None,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    replica_cpus: float = 1.0,
    **settings: Any,
) -> None:
    """Serve ARTIFACTS over HTTP: /v1/fill-mask, /v1/generate and OpenAI's /v1/completions."""
    for path in artifacts:
        read_manifest(path)  # a one-line error for anything that is not a complete artifact
    _need("fastapi")  # operations imports pydantic
    if settings.get("metrics", True):
        _need("prometheus_client")
    from .auth import api_keys, bind_warning
    from .operations import check_options

    settings["api_keys"] = api_keys(settings.get("api_keys") or ())
    settings["threads"] = settings.get("threads")
    config = ServeConfig().update(**settings)
    check_options(config)  # before Ray or uvicorn start
    options = {f.name: getattr(config, f.name) for f in fields(config)}
    warning = bind_warning(host, config.api_keys)
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
    _need("uvicorn")
    import uvicorn

    from .app import create_app

    app = create_app(artifacts, config, providers=providers)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(config.request_timeout, 1.0),
                access_log=config.log_format == "text")  # json mode writes its own access lines


def _parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    where: list[tuple[str, Any, Any]] = [
        ("host", "127.0.0.1", Annotated[str, typer.Option(help="Address to bind (loopback by default).")]),
        ("port", 8000, Annotated[int, typer.Option(help="Port to listen on.")]),
        ("providers", "auto", Annotated[str, typer.Option(help="auto | cpu | cuda")]),
        ("log_level", "info", Annotated[str, typer.Option(help="uvicorn log level.")]),
        ("ray", False, Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve instead of one uvicorn process.")]),
        ("ray_address", None, Annotated[Optional[str], typer.Option(
            help="Ray cluster to join (e.g. auto); default: start one.")]),
        ("replicas", 1, Annotated[int, typer.Option(help="Ray Serve replicas (without autoscaling).")]),
        ("min_replicas", None, Annotated[Optional[int], typer.Option(
            help="Autoscaling lower bound (turns autoscaling on).")]),
        ("max_replicas", None, Annotated[Optional[int], typer.Option(
            help="Autoscaling upper bound (turns autoscaling on).")]),
        ("replica_cpus", 1.0, Annotated[float, typer.Option(help="CPUs Ray reserves per replica.")]),
    ]
    artifacts = inspect.Parameter("artifacts", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        list[Path], typer.Argument(help="Artifact directories; each is served under its directory name.")])
    return [artifacts, *(inspect.Parameter(n, kw, default=d, annotation=a) for n, d, a in where), *cli_parameters()]


def serve(**kwargs: Any) -> None:
    run_serve(**kwargs)


serve.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
serve.__annotations__ = {p.name: p.annotation for p in serve.__signature__.parameters.values()}  # type: ignore[attr-defined]
serve.__doc__ = run_serve.__doc__
