"""The installable wheel: `python -m build` gives a wheel and an sdist; in a fresh venv with
no repository on the path, `pip install jaonnx-*.whl[cpu,serve]` gives a working `jaonnx`
(--version, recipes, serve on a prebuilt artifact) without torch, package data included.

pip's cache is reused, so after the first run this is mostly pip resolving and unpacking."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_support import free_port, need

need("build", "dev")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ["jaonnx/serving/static/index.html", "jaonnx/serving/static/app.js", "jaonnx/serving/static/style.css",
                "jaonnx_export/data/corpus_ja.txt", "jaonnx/generation/kv_ops/merge_float32.onnx"]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(venv bin dir, clean env, dist dir): built and installed once for the module."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], work, env)
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], work, env)
    wheel = next(dist.glob("jaonnx-*.whl"))
    started = time.monotonic()
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
         "--disable-pip-version-check", f"{wheel}[cpu,serve]"], work, env)
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB; pip install "
          f"[cpu,serve] took {time.monotonic() - started:.1f} s")
    return venv / "bin", {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}, dist, work


def test_build_gives_a_wheel_and_an_sdist_with_the_package_data(installed: Any) -> None:
    _, _, dist, _ = installed
    wheel, sdist = next(dist.glob("jaonnx-*.whl")), next(dist.glob("jaonnx-*.tar.gz"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGE_DATA) <= names, set(PACKAGE_DATA) - names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {f"runtime/{p}" if p.startswith("jaonnx/") else f"export/{p}" for p in PACKAGE_DATA} <= members


def test_cli_works_outside_the_repository(installed: Any) -> None:
    bin_dir, env, _, work = installed
    from jaonnx import __version__

    assert run([str(bin_dir / "jaonnx"), "--version"], work, env).stdout.strip() == f"jaonnx {__version__}"
    recipes = run([str(bin_dir / "jaonnx"), "recipes", "--json"], work, env).stdout
    assert all(r in recipes for r in ("rinna-roberta", "ken11-albert", "jmedroberta", "gpt2-small-ja", "rinna-gpt-1b"))


def test_runtime_imports_without_torch(installed: Any, artifacts: dict[str, Path]) -> None:
    bin_dir, env, _, work = installed
    code = (
        "import sys, importlib.util, importlib.resources as r\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('transformers') is None\n"
        "import jaonnx, jaonnx.serving.app\n"
        "assert 'site-packages' in jaonnx.__file__, jaonnx.__file__\n"
        f"gen = jaonnx.load({str(artifacts['gpt2-small-ja'])!r})\n"
        "print(gen.generate('東京は', max_new_tokens=4, do_sample=False))\n"
        "assert r.files('jaonnx.serving').joinpath('static/index.html').read_text().count('playground')\n"
        "assert r.files('jaonnx_export').joinpath('data/corpus_ja.txt').read_text(encoding='utf-8')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
    )
    out = run([str(bin_dir / "python"), "-c", code], work, env).stdout.strip()
    import jaonnx

    assert out == jaonnx.load(artifacts["gpt2-small-ja"]).generate("東京は", max_new_tokens=4, do_sample=False)


def test_serve_from_the_wheel(installed: Any, artifacts: dict[str, Path]) -> None:
    bin_dir, env, _, work = installed
    port, key = free_port(), "wheel-key"
    proc = subprocess.Popen([str(bin_dir / "jaonnx"), "serve", str(artifacts["gpt2-small-ja"]), "--port", str(port),
                             "--api-key", key], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(base + "/v1/completions", json={"model": "gpt2-small-ja", "prompt": "x"}).status_code == 401
        assert "jaonnx playground" in httpx.get(base + "/").text
        assert "jaonnx:generation_tokens_total" in httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert key not in err


def test_export_commands_come_from_the_entry_point_and_name_the_missing_extra(installed: Any) -> None:
    """The wheel declares `jaonnx.commands`: the export commands are listed; without torch
    (this venv has [cpu,serve] only) running one is a one-line error naming the extra."""
    bin_dir, env, _, work = installed
    listing = run([str(bin_dir / "jaonnx"), "--help"], work, env).stdout
    assert all(f" {c} " in listing for c in ("export", "twins", "demo"))
    points = run([str(bin_dir / "python"), "-c", "from importlib.metadata import entry_points; "
                  "print([e.value for e in entry_points(group='jaonnx.commands')])"], work, env).stdout
    assert points.strip() == "['jaonnx_export.commands:register']"
    proc = subprocess.run([str(bin_dir / "jaonnx"), "export", "rinna/japanese-roberta-base", "-o", str(work / "x")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs the export extra (torch is missing): pip install 'jaonnx[cpu,export]'" in proc.stderr
