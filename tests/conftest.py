"""Shared fixtures: the five twins are built once per session and exported through the
`jaonnx export` command. Set JAONNX_TEST_CACHE=DIR to reuse them across runs while developing:
each twin and artifact there is keyed by the code that made it (see cache_keys.py) and is
rebuilt when that code changed, never reused stale."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ci_skips import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401 (hooks: an unlisted skip fails CI)

MLM = ["rinna-roberta", "ken11-albert", "jmedroberta"]
GPT = ["gpt2-small-ja", "rinna-gpt-1b"]
ALL = MLM + GPT


@pytest.fixture(scope="session", autouse=True)
def _ort_graph_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Sessions cache ORT-optimized graphs; keep the tests' out of the user's ~/.cache."""
    os.environ.setdefault("JAONNX_CACHE_DIR", str(tmp_path_factory.mktemp("ort-cache")))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = os.environ.get("JAONNX_TEST_CACHE")
    return Path(cached) if cached else tmp_path_factory.mktemp("jaonnx")


@pytest.fixture(scope="session")
def twins_dir(cache_dir: Path) -> Path:
    from jaonnx_export.twins import TWINS

    root = cache_dir / "twins"  # may be a symlink to a shared cache: written through, kept
    for name in TWINS:
        ensure_twin(root, name)
    return root


@pytest.fixture(scope="session")
def test_twins_dir(cache_dir: Path) -> Path:
    """Where the test-only twins (jaonnx_export.twins.TEST_TWINS) are built on demand."""
    return cache_dir / "test-twins"


def ensure_twin(root: Path, name: str) -> Path:
    """`root/name`, (re)built unless it was built by today's twin builder."""
    from cache_keys import is_fresh, locked, stamp, twin_key, unstamp
    from jaonnx_export.twins import build_twins

    twin, key = root / name, twin_key(name)
    if not is_fresh(twin, key, "config.json"):
        with locked(twin):
            if not is_fresh(twin, key, "config.json"):  # another session may have just built it
                unstamp(twin)
                build_twins(root, [name])
                stamp(twin, key)
    return twin


def run_cli(*args: str) -> "object":
    from typer.testing import CliRunner

    from jaonnx.cli import app

    return CliRunner().invoke(app, list(args))


def export_via_cli(src: Path, out: Path, *extra: str) -> Path:
    """`jaonnx export SRC -o OUT EXTRA...`, unless OUT was exported from these very checkpoint
    bytes, with these flags, by today's exporter. Into a scratch directory renamed into place
    under a lock, so concurrent test sessions sharing JAONNX_TEST_CACHE never see half an
    artifact nor export it twice."""
    import shutil
    import tempfile

    from cache_keys import artifact_key, is_fresh, locked, stamp, unstamp

    key = artifact_key(src, extra)
    if is_fresh(out, key, "jaonnx.json"):
        return out
    with locked(out):
        if not is_fresh(out, key, "jaonnx.json"):
            unstamp(out)
            scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
            result = run_cli("export", str(src), "-o", str(scratch), *extra)
            if result.exit_code != 0:
                shutil.rmtree(scratch, ignore_errors=True)
            assert result.exit_code == 0, result.output
            if out.exists():
                shutil.rmtree(out)
            scratch.rename(out)
            stamp(out, key)
    return out


@pytest.fixture(scope="session")
def artifacts(twins_dir: Path, cache_dir: Path) -> dict[str, Path]:
    """recipe id -> artifact directory exported with `jaonnx export`."""
    return {r: export_via_cli(twins_dir / r, cache_dir / "artifacts" / r) for r in ALL}
