"""Shared fixtures: the five twins are built once per session and exported through the
`jaonnx export` command. Set JAONNX_TEST_CACHE=DIR to reuse them across runs while developing."""

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
    from jaonnx_export.twins import TWINS, build_twins

    root = cache_dir / "twins"
    missing = [r for r in TWINS if not (root / r / "config.json").is_file()]
    if missing:
        build_twins(root, missing)
    return root


def run_cli(*args: str) -> "object":
    from typer.testing import CliRunner

    from jaonnx.cli import app

    return CliRunner().invoke(app, list(args))


def export_via_cli(src: Path, out: Path, *extra: str) -> Path:
    """`jaonnx export SRC -o OUT EXTRA...`, into a scratch directory renamed into place, so
    concurrent test sessions sharing JAONNX_TEST_CACHE never see half an artifact."""
    import shutil
    import tempfile

    if not (out / "jaonnx.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        result = run_cli("export", str(src), "-o", str(scratch), *extra)
        assert result.exit_code == 0, result.output
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    return out


@pytest.fixture(scope="session")
def artifacts(twins_dir: Path, cache_dir: Path) -> dict[str, Path]:
    """recipe id -> artifact directory exported with `jaonnx export`."""
    return {r: export_via_cli(twins_dir / r, cache_dir / "artifacts" / r) for r in ALL}
