"""The playground at `/`: one static page (plain HTML, CSS and JS shipped in the package, no
build step, no CDN) that talks to the public API like any client: `/v1/models`, `/v1/fill-mask`
and streamed `/v1/completions`, with the API key the user types in."""

# (no `from __future__ import annotations`: FastAPI reads the route signatures)

from importlib import resources
from typing import Any

TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


def static_files() -> dict[str, bytes]:
    """name -> content of every file in `serving/static` (read once, at app start)."""
    root = resources.files("jaonnx.serving").joinpath("static")
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and not f.name.startswith(".")}


def playground_router() -> Any:
    from fastapi import APIRouter
    from fastapi.responses import Response

    from .schemas import RequestError

    files = static_files()
    router = APIRouter()

    def send(name: str) -> Any:
        kind = next((t for ext, t in TYPES.items() if name.endswith(ext)), None)
        if name not in files or kind is None:
            raise RequestError(404, f"no static file {name[:60]!r}", None, "not_found_error")
        return Response(files[name], media_type=kind, headers={"Cache-Control": "no-cache"})

    @router.get("/", summary="The playground page", response_class=Response)
    async def playground() -> Any:
        return send("index.html")

    @router.get("/static/{name}", summary="The playground's CSS and JS", response_class=Response)
    async def static(name: str) -> Any:
        return send(name)

    return router
