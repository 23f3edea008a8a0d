"""Serving: an HTTP app (FastAPI on uvicorn) or a Ray Serve deployment, over batching workers.

    from jaonnx.serving import create_app
    app = create_app(["artifacts/rinna-roberta", "artifacts/gpt2-small-ja"], max_batch_size=16)

Names are imported lazily so `import jaonnx` never needs the `serve` extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("ServeConfig", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "serve":
        from .command import serve

        return serve
    raise AttributeError(name)
