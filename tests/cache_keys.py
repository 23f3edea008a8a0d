"""Keys for the reused test cache (JAONNX_TEST_CACHE), so a stale twin or artifact is never
reused silently.

A twin is keyed by the code that builds it (the twin builder, the corpus, the recipes) and
the library versions that shape its training; an artifact by the exporter's code, the exact
bytes of the checkpoint it came from and the export flags. The key is written beside the
directory (`.NAME.key`), so the twin and artifact directories hold only what the tools wrote,
and a twins root that is a symlink to a shared cache keeps working. A rebuild runs under a
lock (`.NAME.lock`), so concurrent test sessions sharing a cache build each thing once.

    python tests/cache_keys.py adopt-twins DIR   # stamp twins you know are current (a shared
                                                 # cache built before keys existed)
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KEY_FORMAT = "1"  # bump to invalidate every cached twin and artifact at once
TWIN_LIBRARIES = ("torch", "transformers", "sentencepiece", "tokenizers")
EXPORT_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "sentencepiece", "tokenizers")


def _versions(names: Iterable[str]) -> str:
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} absent")
    return ";".join(out)


def hash_files(paths: Iterable[Path], digest: Any = None) -> str:
    """sha256 over each file's name (relative to the listed path's parent) and bytes,
    directories walked in sorted order; bytecode caches and our own sidecars skipped."""
    h = digest or hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".key", ".lock"):
                continue
            h.update(str(f.relative_to(path.parent)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _packages() -> tuple[Path, Path]:
    import jaonnx
    import jaonnx_export

    return Path(jaonnx.__file__).parent, Path(jaonnx_export.__file__).parent


@functools.lru_cache(maxsize=None)
def _twin_code_hash() -> str:
    runtime, export = _packages()
    files = [export / "twins", export / "corpus.py", export / "data", runtime / "recipes.py",
             runtime / "tokenization" / "normalize.py"]
    return hash_files(files)


@functools.lru_cache(maxsize=None)
def _exporter_code_hash() -> str:
    """The exporter package (its twin builder aside: a twin's bytes are keyed separately) and
    the runtime modules whose definitions land in an artifact."""
    runtime, export = _packages()
    files = [p for p in sorted(export.iterdir()) if p.name != "twins"]
    files += [runtime / "artifact.py", runtime / "recipes.py", runtime / "tokenization"]
    return hash_files(files)


def twin_key(name: str) -> str:
    h = hashlib.sha256(f"twin {KEY_FORMAT} {name} {_versions(TWIN_LIBRARIES)} {_twin_code_hash()}".encode())
    return h.hexdigest()


def artifact_key(src: Path, flags: Iterable[str]) -> str:
    """The exporter's code, the source checkpoint's bytes and the export flags."""
    h = hashlib.sha256(f"artifact {KEY_FORMAT} {_versions(EXPORT_LIBRARIES)} {_exporter_code_hash()}".encode())
    h.update(("\0".join(flags) + "\0").encode())
    return hash_files(sorted(Path(src).iterdir()), h)


def _sidecar(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{suffix}"


def is_fresh(path: Path, key: str, marker: str) -> bool:
    """`path/marker` exists and `path` was made under `key`."""
    stamp = _sidecar(path, "key")
    return (path / marker).is_file() and stamp.is_file() and stamp.read_text().strip() == key


def stamp(path: Path, key: str) -> None:
    _sidecar(path, "key").write_text(key + "\n")


def unstamp(path: Path) -> None:
    _sidecar(path, "key").unlink(missing_ok=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock for (re)building `path`, shared by every process using this cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(_sidecar(path, "lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def adopt_twins(root: Path, names: Iterable[str]) -> list[str]:
    """Stamp existing twins with today's key, without rebuilding them: for a cache whose twins
    you know came from the current builder (one made before keys existed)."""
    adopted = []
    for name in names:
        if (root / name / "config.json").is_file():
            stamp(root / name, twin_key(name))
            adopted.append(name)
    return adopted


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "adopt-twins":
        sys.exit("usage: python tests/cache_keys.py adopt-twins TWINS_DIR")
    from jaonnx_export.twins import TWINS

    print("stamped:", ", ".join(adopt_twins(Path(sys.argv[2]), TWINS)) or "nothing")
