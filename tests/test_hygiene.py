"""Test hygiene and the checks a reviewer would want to be able to fail:

- the reused test cache (JAONNX_TEST_CACHE) is keyed by the code that made each twin and
  artifact, so nothing stale is reused silently, also when the twins dir is a symlink;
- manifest values that load but are absurd, and a corrupted model.onnx, are one-line
  JaonnxErrors at load;
- API keys are compared only with `hmac.compare_digest`, every key every time, and never
  reach stdout or stderr.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cache_keys
import conftest
import jaonnx
from jaonnx.artifact import MANIFEST_NAME
from jaonnx.errors import JaonnxError

REPO = Path(__file__).resolve().parents[1]


# ---- the keyed test cache -------------------------------------------------------------------

def test_hypothesis_database_is_ignored():
    done = subprocess.run(["git", "check-ignore", "-q", ".hypothesis/examples/x"], cwd=REPO)
    assert done.returncode == 0, ".hypothesis/ is not in .gitignore"


@pytest.fixture
def code_copy(tmp_path, monkeypatch):
    """Copies of the runtime and exporter packages that the cache keys read instead."""
    import jaonnx_export

    runtime = tmp_path / "code" / "jaonnx"
    export = tmp_path / "code" / "jaonnx_export"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(jaonnx.__file__).parent, runtime, ignore=ignore)
    shutil.copytree(Path(jaonnx_export.__file__).parent, export, ignore=ignore)
    monkeypatch.setattr(cache_keys, "_packages", lambda: (runtime, export))
    yield runtime, export
    for cached in (cache_keys._twin_code_hash, cache_keys._exporter_code_hash):
        cached.cache_clear()


def _keys(twin: Path) -> tuple[str, str]:
    for cached in (cache_keys._twin_code_hash, cache_keys._exporter_code_hash):
        cached.cache_clear()
    return cache_keys.twin_key("gpt2-small-ja"), cache_keys.artifact_key(twin, ["--kv-cache", "concat"])


def _touch(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")


def test_keys_follow_the_code_that_made_the_thing(code_copy, tmp_path, twins_dir):
    runtime, export = code_copy
    twin = tmp_path / "twin"
    shutil.copytree(twins_dir / "gpt2-small-ja", twin)
    twin_key, art_key = _keys(twin)
    assert _keys(twin) == (twin_key, art_key)  # deterministic

    _touch(export / "export.py")  # the exporter: artifacts only
    assert _keys(twin)[0] == twin_key and _keys(twin)[1] != art_key
    twin_key, art_key = _keys(twin)

    _touch(export / "twins" / "build.py")  # the twin builder: twins only
    assert _keys(twin)[0] != twin_key and _keys(twin)[1] == art_key
    twin_key, art_key = _keys(twin)

    _touch(runtime / "recipes.py")  # recipes shape both
    assert _keys(twin)[0] != twin_key and _keys(twin)[1] != art_key
    twin_key, art_key = _keys(twin)

    (twin / "config.json").write_text((twin / "config.json").read_text() + " ")  # the checkpoint's bytes
    assert _keys(twin) == (twin_key, cache_keys.artifact_key(twin, ["--kv-cache", "concat"]))
    assert cache_keys.artifact_key(twin, ["--kv-cache", "concat"]) != art_key
    assert cache_keys.artifact_key(twin, ["--kv-cache", "static"]) != cache_keys.artifact_key(twin, ["--kv-cache", "concat"])


def test_export_via_cli_reexports_only_when_the_key_changes(tmp_path, monkeypatch, twins_dir):
    calls: list[list[str]] = []

    def fake_cli(*args: str):
        calls.append(list(args))
        out = Path(args[args.index("-o") + 1])
        (out / MANIFEST_NAME).write_text(json.dumps({"n": len(calls)}))
        return type("Result", (), {"exit_code": 0, "output": ""})()

    monkeypatch.setattr(conftest, "run_cli", fake_cli)
    twin = tmp_path / "twin"
    shutil.copytree(twins_dir / "gpt2-small-ja", twin)
    out = tmp_path / "cache" / "artifacts" / "a"
    conftest.export_via_cli(twin, out)
    conftest.export_via_cli(twin, out)
    assert len(calls) == 1  # reused
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]  # the key sits beside it
    conftest.export_via_cli(twin, out, "--kv-cache", "concat")
    assert len(calls) == 2  # other flags
    (twin / "generation_config.json").write_text("{}")
    conftest.export_via_cli(twin, out, "--kv-cache", "concat")
    assert len(calls) == 3  # the checkpoint changed
    monkeypatch.setattr(cache_keys, "KEY_FORMAT", "changed")  # as if the exporter's code changed
    conftest.export_via_cli(twin, out, "--kv-cache", "concat")
    assert len(calls) == 4
    assert json.loads((out / MANIFEST_NAME).read_text()) == {"n": 4}
    (out / MANIFEST_NAME).unlink()  # a half-deleted artifact is not reused either
    conftest.export_via_cli(twin, out, "--kv-cache", "concat")
    assert len(calls) == 5


def test_stale_twins_are_rebuilt_through_a_symlinked_twins_dir(tmp_path, monkeypatch):
    import jaonnx_export.twins as twins

    built: list[str] = []

    def fake_build(root, names, **_):
        for name in names:
            (Path(root) / name).mkdir(parents=True, exist_ok=True)
            (Path(root) / name / "config.json").write_text(json.dumps({"build": len(built)}))
            built.append(name)

    monkeypatch.setattr(twins, "build_twins", fake_build)
    shared = tmp_path / "shared-twins"
    shared.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "twins").symlink_to(shared)
    root = cache / "twins"
    conftest.ensure_twin(root, "gpt2-small-ja")
    conftest.ensure_twin(root, "gpt2-small-ja")
    assert built == ["gpt2-small-ja"]
    monkeypatch.setattr(cache_keys, "twin_key", lambda name: "a newer builder")
    conftest.ensure_twin(root, "gpt2-small-ja")
    assert built == ["gpt2-small-ja"] * 2
    assert root.is_symlink() and (shared / "gpt2-small-ja" / "config.json").is_file()
    assert (shared / ".gpt2-small-ja.key").read_text().strip() == "a newer builder"
    # a twin from before keys existed (no stamp) is rebuilt, not trusted
    (shared / ".gpt2-small-ja.key").unlink()
    conftest.ensure_twin(root, "gpt2-small-ja")
    assert len(built) == 3


# ---- absurd manifests and corrupted graphs ----------------------------------------------------

ABSURD = [
    ("gpt2-small-ja", "vocab_size", 10**6),
    ("rinna-roberta", "vocab_size", 10**6),
    ("ken11-albert", "vocab_size", 10**5),
    ("gpt2-small-ja", "max_positions", 10**9),
    ("rinna-roberta", "max_positions", 10**9),
    ("gpt2-small-ja", "decoder.num_layers", 1000),
    ("rinna-gpt-1b", "decoder.num_layers", 4),
    ("gpt2-small-ja", "decoder.num_heads", 10**5),
    ("rinna-gpt-1b", "decoder.num_heads", 8),
    ("gpt2-small-ja", "decoder.head_dim", 10**6),
    ("rinna-gpt-1b", "decoder.head_dim", 8),
]


@pytest.mark.parametrize("name, field, value", ABSURD)
def test_absurd_manifest_values_fail_at_load(artifacts, tmp_path, name, field, value):
    directory = tmp_path / name
    shutil.copytree(artifacts[name], directory)
    data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    *parents, last = field.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    (directory / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(JaonnxError) as info:
        jaonnx.load(directory, providers="cpu")
    assert field in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["gpt2-small-ja", "ken11-albert"])
@pytest.mark.parametrize("spoil", ["empty", "truncated", "garbage"])
def test_a_corrupted_model_onnx_is_a_one_line_error(artifacts, tmp_path, name, spoil):
    directory = tmp_path / name
    shutil.copytree(artifacts[name], directory)
    data = (directory / "model.onnx").read_bytes()
    spoiled = {"empty": b"", "truncated": data[: len(data) // 3], "garbage": bytes(range(256)) * 8}[spoil]
    (directory / "model.onnx").write_bytes(spoiled)
    with pytest.raises(JaonnxError) as info:
        jaonnx.load(directory, providers="cpu")
    assert "model.onnx" in str(info.value) and "\n" not in str(info.value)


# ---- API keys ---------------------------------------------------------------------------------

def _auth_module():
    from serving_support import need

    need("fastapi", "serve")  # a skip where the serve extra is missing; under CI=true, a failure
    from jaonnx.serving import auth

    return auth


KEYISH = {"key", "keys", "token", "digest", "digests", "known", "header", "secret"}


def test_keys_are_compared_only_with_hmac_compare_digest():
    """No ==, !=, in or `is` on anything key-like in serving/auth.py (bar `is None`), and
    `allowed` calls hmac.compare_digest."""
    auth = _auth_module()
    tree = ast.parse(inspect.getsource(auth))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) and all(
                isinstance(c, ast.Constant) and c.value is None for c in node.comparators):
            continue
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        assert not names & KEYISH, f"line {node.lineno}: {ast.unparse(node)} compares a key directly"
    allowed = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "allowed")
    calls = [ast.unparse(n.func) for n in ast.walk(allowed) if isinstance(n, ast.Call)]
    assert "hmac.compare_digest" in calls
    assert not any(isinstance(n, (ast.Break, ast.Return)) for loop in ast.walk(allowed)
                   if isinstance(loop, ast.For) for n in ast.walk(loop)), "early exit leaks which key matched"


def test_every_key_is_compared_every_time(monkeypatch):
    """Whether the first, the last or no key matches, compare_digest runs once per key."""
    auth = _auth_module()
    seen: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ("first-key-111", "second-key-222", "third-key-333")
    gate = auth.ApiKeyAuth(app=None, keys=keys)
    for header, expected in [(b"Bearer first-key-111", True), (b"Bearer third-key-333", True),
                             (b"Bearer wrong", False), (b"bearer second-key-222", True)]:
        seen.clear()
        assert gate.allowed(header) is expected
        assert len(seen) == len(keys), header
        assert all(len(a) == len(b) == 32 for a, b in seen)  # digests: the length of a key never leaks


def test_keys_never_reach_stdout_or_stderr(artifacts):
    """`jaonnx serve` with a key on the command line and one in the environment; requests
    with the right key, a wrong key and none: neither key appears on stdout or stderr."""
    _auth_module()
    from serving_support import free_port
    import httpx

    port, cli_key, env_key, wrong = free_port(), "cli-key-7f3a9c", "env-key-b41d22", "wrong-key-0e5f"
    env = {**os.environ, "JAONNX_API_KEY": env_key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaonnx", "serve", str(artifacts["gpt2-small-ja"]), "--api-key", cli_key,
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 2, "temperature": 0}
        for key, status in [(cli_key, 200), (env_key, 200), (wrong, 401), (None, 401)]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=60).status_code == status
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert err.strip(), "no log at all: the check below would prove nothing"
    for secret in (cli_key, env_key, wrong):
        assert secret not in out and secret not in err, secret
