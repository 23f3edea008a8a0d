"""`jaonnx cache list|prune|clear`: see and bound the ORT optimized-graph cache (ort_cache.py).

Every subcommand prints one JSON object, so scripts and CI can read it."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from . import ort_cache

cache_app = typer.Typer(help="List, prune or clear the cache of ORT-optimized graphs.", no_args_is_help=True)


def _print(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _summary(entries: list[ort_cache.Entry]) -> dict[str, Any]:
    return {"entries": [e.to_dict() for e in entries], "count": len(entries),
            "own_bytes": sum(e.own_bytes for e in entries), "shared_bytes": sum(e.shared_bytes for e in entries)}


@cache_app.command("list")
def list_entries() -> None:
    """Entries, least recently used first, with the disk each costs (hard-linked weights are shared)."""
    root = ort_cache.cache_root()
    _print({"root": str(root) if root else None, "max_bytes": ort_cache.max_bytes(), **_summary(ort_cache.entries())})


@cache_app.command()
def prune(
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="Bound, e.g. 2G or 500M "
                                                    "(default: $JAONNX_CACHE_MAX_SIZE or 4G).")] = None,
) -> None:
    """Delete least recently used entries until the cache fits the bound."""
    limit = ort_cache.parse_size(max_size, "--max-size") if max_size is not None else ort_cache.max_bytes()
    deleted = ort_cache.prune(limit)
    _print({"max_bytes": limit, "deleted": _summary(deleted), "kept": _summary(ort_cache.entries())})


@cache_app.command()
def clear() -> None:
    """Delete every entry (later loads optimize again, once)."""
    _print({"deleted": _summary(ort_cache.clear())})
