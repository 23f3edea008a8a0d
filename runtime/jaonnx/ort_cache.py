"""The on-disk cache of ORT-optimized graphs: where entries live, what they cost, and keeping it bounded.

Why a cache: ORT's level-99 graph passes take seconds on a large graph (12 s for GPT-2 small fp32
on a busy machine), paid by every new process; a cached optimized graph loads with the passes off.
Artifacts whose graph those passes leave unchanged (manifest `ort_fixed_point`, checked at export:
the static-KV decoders) and whose weights are mapped from model.onnx.data skip the cache (model.py):
an entry would only copy their weights, and writing it made their first load ~3x slower.

Why bounded: each entry holds the optimized graph's weights. Without a bound the cache grew to
8.3 GB in 64 entries in a day of tests and benchmarks. Now:
- entries keep their own copy of the weights: a hard link to the artifact's data file would save
  the disk, but `onnx.load` then refuses the artifact ("multiple hard links ... hardlink attack"),
  so the user could no longer open their own artifact with onnx (`shared_bytes` counts links
  that older versions made);
- after each new entry the least recently used entries are deleted until the cache's own bytes
  fit $JAONNX_CACHE_MAX_SIZE (default 4G; "0" keeps nothing beyond the entry just written);
- `jaonnx cache list|prune|clear` shows and empties it.

Layout: <root>/<key>/model.onnx + weights.data (+ source.json: which artifact it came from).
An entry is written in a scratch folder and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import JaonnxError

CACHE_ENV = "JAONNX_CACHE_DIR"  # where optimized graphs go; "off" disables the cache
SIZE_ENV = "JAONNX_CACHE_MAX_SIZE"  # the bound on the cache's own bytes, e.g. 4G, 500M, 0
DEFAULT_MAX_BYTES = 4 * 2**30
GRAPH, WEIGHTS, SOURCE = "model.onnx", "weights.data", "source.json"
_SCRATCH = ".tmp-"
_STALE_SCRATCH_S = 3600  # a scratch folder older than this belongs to a process that died
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def cache_root() -> Path | None:
    """$JAONNX_CACHE_DIR, else $XDG_CACHE_HOME/jaonnx/ort, else ~/.cache/jaonnx/ort; None when off."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "jaonnx" / "ort"


def parse_size(text: str, field: str = SIZE_ENV) -> int:
    """'4G', '500M', '1.5G', '123' (bytes) -> bytes; anything else is a one-line error naming `field`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise JaonnxError(f"{field} must be a size such as 4G, 500M or 0, not {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def max_bytes() -> int:
    env = os.environ.get(SIZE_ENV, "").strip()
    return parse_size(env) if env else DEFAULT_MAX_BYTES


def cpu_signature() -> str:
    """The CPU features an ORT-optimized graph may depend on (its level-99 layout passes)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return " ".join(sorted(set(flags.split(":", 1)[-1].split())))


def model_files(model_path: Path) -> list[Path]:
    """The graph and its external data file(s), the files a cache key must cover."""
    return [model_path, *sorted(model_path.parent.glob(model_path.name + ".data"))]


def entry_path(model_path: Path, level: str, providers: Sequence[str], ort_version: str) -> Path | None:
    """Where the optimized form of `model_path` is cached: keyed by the model files (size,
    mtime), the ORT version, the providers, the optimization level and the CPU's features."""
    root = cache_root()
    if root is None:
        return None
    parts = [str(model_path.resolve()), ort_version, level, ",".join(providers), cpu_signature()]
    for path in model_files(model_path):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return root / key / GRAPH


def scratch_dir(entry_graph: Path) -> Path:
    """A private folder for this process to write an entry into (renamed into place by publish)."""
    scratch = entry_graph.parent.with_name(f"{_SCRATCH}{entry_graph.parent.name}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def publish(scratch: Path, entry_graph: Path, model_path: Path, limit: int) -> None:
    """Record the source, move the entry into place (a concurrent writer's entry is as good:
    ours is dropped), then prune the cache to `limit` bytes."""
    try:
        (scratch / SOURCE).write_text(json.dumps({"model": str(model_path.resolve()), "created": time.time()}))
        os.rename(scratch, entry_graph.parent)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        return
    root = entry_graph.parent.parent
    prune(limit, root=root, keep=entry_graph.parent.name)


def discard(scratch: Path) -> None:
    """Drop a scratch folder whose session failed to load."""
    shutil.rmtree(scratch, ignore_errors=True)


def touch(entry_graph: Path) -> None:
    """Mark an entry as just used (LRU order is the entry folder's mtime)."""
    try:
        os.utime(entry_graph.parent)
    except OSError:
        pass


@dataclass(frozen=True)
class Entry:
    key: str
    path: str
    model: str | None  # the artifact graph it was made from
    own_bytes: int  # disk the entry costs
    shared_bytes: int  # weights hard-linked to the artifact's data file (no extra disk)
    last_used: float  # seconds since the epoch

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's complete entries, least recently used first."""
    root = root if root is not None else cache_root()
    if root is None or not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(_SCRATCH) or not (folder / GRAPH).is_file():
            continue
        own = shared = 0
        for f in folder.iterdir():
            stat = f.stat()
            if stat.st_nlink > 1:
                shared += stat.st_size
            else:
                own += stat.st_size
        try:
            model = json.loads((folder / SOURCE).read_text()).get("model")
        except (OSError, ValueError):
            model = None
        found.append(Entry(folder.name, str(folder), model, own, shared, folder.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def prune(limit: int, root: Path | None = None, keep: str | None = None) -> list[Entry]:
    """Delete least recently used entries (never `keep`) until the cache's own bytes are <= limit,
    and scratch folders left by dead processes; returns what was deleted."""
    root = root if root is not None else cache_root()
    if root is None or not root.is_dir():
        return []
    now = time.time()
    for folder in root.glob(_SCRATCH + "*"):
        try:
            if now - folder.stat().st_mtime > _STALE_SCRATCH_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
    listed = entries(root)
    total = sum(e.own_bytes for e in listed)
    deleted = []
    for entry in listed:
        if total <= limit:
            break
        if entry.key == keep:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.own_bytes
        deleted.append(entry)
    return deleted


def clear(root: Path | None = None) -> list[Entry]:
    """Delete every entry."""
    return prune(-1, root=root)
