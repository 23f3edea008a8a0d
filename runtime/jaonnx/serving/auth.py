"""API keys: `Authorization: Bearer KEY` on every `/v1/*` route (and `/metrics` if asked).

Keys come from `--api-key` (repeatable) and `JAONNX_API_KEY` (comma-separated). They are
compared in constant time (as SHA-256 digests, so not even their length leaks) and never
logged. `/health`, the playground and the API docs stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import JaonnxError

ENV_VAR = "JAONNX_API_KEY"


def api_keys(given: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The keys from the command line plus those in JAONNX_API_KEY; blank keys are refused."""
    keys = [k.strip() for k in given]
    if any(not k for k in keys):
        raise JaonnxError("--api-key is empty: give a non-empty key")
    env = environ.get(ENV_VAR, "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    for key in keys:
        if any(ch.isspace() or not ch.isprintable() for ch in key):
            raise JaonnxError("an API key holds whitespace or control characters: use printable characters only")
    return tuple(dict.fromkeys(keys))


def bind_warning(host: str, keys: tuple[str, ...]) -> str | None:
    """A one-line warning when the server is reachable beyond this machine with no key."""
    if keys:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach the port can use it "
            f"(set --api-key or {ENV_VAR})")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyAuth:
    """ASGI middleware: a 401 JSON error (the server's error shape) unless a key matches."""

    def __init__(self, app: Any, keys: tuple[str, ...], protect_metrics: bool = False) -> None:
        self.app = app
        self.digests = [_digest(k.encode()) for k in keys]
        self.protect_metrics = protect_metrics

    def protects(self, path: str) -> bool:
        return (path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize")
                or (self.protect_metrics and path == "/metrics"))

    def allowed(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        digest = _digest(token.strip())
        ok = False
        for known in self.digests:  # no early exit: every key is compared
            ok |= hmac.compare_digest(digest, known)
        return ok

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.digests or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.allowed(header):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if header is None
                   else "invalid API key: check the key sent in 'Authorization: Bearer <key>'")
        body = json.dumps({"error": {"message": message, "type": "authentication_error", "field": None,
                                     "param": None, "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
