"""`ServeConfig`: the server's batching, limits and operations settings, spelled once.

Each field carries its help text and command-line flags in its metadata; `jaonnx serve`'s
options are built from these fields (`cli_parameters`), so a new setting is one new field here.
Plain dataclasses only: `jaonnx serve --help` must work without the `serve` extra.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Setting:
    """How `jaonnx serve` offers one `ServeConfig` field: its help and flags (default: the
    field name with dashes), and the type the command line parses (default: the field's)."""

    help: str
    flags: tuple[str, ...] = ()
    cli_type: Any = None


def setting(default: Any, help: str, *flags: str, cli_type: Any = None) -> Any:
    return field(default=default, metadata={"setting": Setting(help, flags, cli_type)})


@dataclass
class ServeConfig:
    """Batching and limits; the defaults suit a CPU box."""

    max_batch_size: int = setting(16, "Fill-mask texts per batch; generation rows per decode step.")
    max_wait_ms: float = setting(5.0, "How long a fill-mask batch waits to fill up.")
    max_queue: int = setting(64, "Requests waiting per model before 503 + Retry-After.")
    request_timeout: float = setting(120.0, "Per-request timeout in seconds, queueing included.", "--timeout")
    max_body_bytes: int = setting(1 << 20, "Larger request bodies get 413.")
    retry_after: int = setting(1, "Seconds sent in Retry-After with a 503.")
    threads: int | None = setting(None, "ONNX Runtime threads per model (default: physical cores).", cli_type=int)
    spinning: bool = setting(False, "Let idle ORT threads busy-wait (faster alone, worse when models share cores).",
                             "--spin/--no-spin")
    # operations: see operations.py
    api_keys: tuple[str, ...] = setting(
        (), "Require 'Authorization: Bearer KEY' on /v1/*; repeat for several keys (also JAONNX_API_KEY, "
            "comma-separated).", "--api-key", cli_type=list[str])
    metrics: bool = setting(True, "Serve Prometheus metrics on /metrics.", "--metrics/--no-metrics")
    metrics_auth: bool = setting(False, "Require an API key on /metrics too.", "--metrics-auth")
    log_format: str = setting("text", "text (uvicorn's access log) | json (one JSON line per request, no prompt text).")
    log_prompts: bool = setting(False, "Put the prompt text in JSON access logs.", "--log-prompts")

    def update(self, **overrides: Any) -> ServeConfig:
        """Set fields by name; an unknown name is an error naming it."""
        from ..errors import JaonnxError

        names = {f.name for f in fields(self)}
        for key, value in overrides.items():
            if key not in names:
                raise JaonnxError(f"unknown serving option {key!r}", key)
            setattr(self, key, value)
        return self


def cli_parameters() -> list[Any]:
    """`jaonnx serve`'s keyword parameters for the `ServeConfig` fields, for typer."""
    import inspect
    from typing import Annotated, Optional

    import typer

    params = []
    for f in fields(ServeConfig):
        spec: Setting = f.metadata["setting"]
        kind = spec.cli_type or {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        annotation = Optional[kind] if spec.cli_type is not None else kind
        flags = spec.flags or ("--" + f.name.replace("_", "-"),)
        default = None if spec.cli_type is not None and f.default in ((), None) else f.default
        assert default is not MISSING
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[annotation, typer.Option(*flags, help=spec.help)]))
    return params
