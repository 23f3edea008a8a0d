"""The export side's structure: registered adapters that know nothing of parity, one runtime-
logits path for parity and quality, export commands registered by jaonnx_export (the runtime's
CLI never imports it), and no import circle inside jaonnx.bench."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import typer
from helpers import assert_one_line_error, jaonnx_cli

from jaonnx.errors import JaonnxError
from jaonnx.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
RUNTIME, EXPORT = ROOT / "runtime" / "jaonnx", ROOT / "export" / "jaonnx_export"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT).parts[1:-1]  # runtime/jaonnx/bench/rss.py -> (jaonnx, bench)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = list(package[: len(package) - node.level + 1])
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_the_runtime_never_imports_the_exporter():
    offenders = [str(p.relative_to(ROOT)) for p in RUNTIME.rglob("*.py")
                 if any(m.split(".")[0] == "jaonnx_export" for m in imported_modules(p))]
    assert offenders == []


def test_bench_modules_import_each_other_without_a_circle():
    modules = {p.stem: p for p in (RUNTIME / "bench").glob("*.py") if p.stem != "__init__"}
    edges = {name: {m.rsplit(".", 1)[-1] for m in imported_modules(path) if m.startswith("jaonnx.bench.")} & set(modules)
             for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert [name for name in modules if reaches(name, name, set())] == []


def test_every_recipe_has_a_registered_adapter_that_knows_nothing_of_parity():
    from jaonnx_export import architectures

    for recipe in RECIPES.values():
        adapter = architectures.adapter_for(recipe.architecture)
        assert isinstance(adapter, architectures.Architecture) and adapter.task == recipe.task
        assert not any("parity" in name or "reference" in name for name in dir(adapter))
    assert not {m for m in imported_modules(EXPORT / "architectures.py")
                if m.split(".")[-1] in ("parity", "quality", "references", "runtime_logits")}
    with pytest.raises(JaonnxError, match="no exporter for XLNetLMHeadModel"):
        architectures.adapter_for("XLNetLMHeadModel")
    with pytest.raises(ValueError, match="already has an adapter"):
        architectures.register("GPT2LMHeadModel")(architectures.GPT2)


def test_parity_and_quality_read_the_artifact_through_one_helper():
    for name in ("parity.py", "quality.py"):
        modules = imported_modules(EXPORT / name)
        assert "jaonnx_export.runtime_logits.RuntimeLogits" in modules, name
        assert not {m for m in modules if m.startswith(("jaonnx.fill_mask", "jaonnx.generation"))}, name


def test_the_entry_point_registers_the_export_commands():
    """pyproject's `jaonnx.commands` entry point names a register function that adds exactly
    export, twins and demo (checked from the file: the editable install may predate it)."""
    import importlib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (target,) = project["entry-points"]["jaonnx.commands"].values()
    module, _, attr = target.partition(":")
    app = typer.Typer()
    getattr(importlib.import_module(module), attr)(app)
    assert sorted(info.callback.__name__ for info in app.registered_commands) == ["demo", "export", "twins"]


def test_export_commands_work_through_the_cli_and_plugins_load_lazily():
    listing = jaonnx_cli("--help")
    assert listing.returncode == 0 and all(f" {c} " in listing.stdout for c in ("export", "twins", "demo"))
    helped = jaonnx_cli("export", "--help")
    assert helped.returncode == 0 and "--kv-cache" in helped.stdout, helped.stderr
    code = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from jaonnx.cli import app
        assert CliRunner().invoke(app, ["recipes", "--json"]).exit_code == 0
        print(",".join(sorted(m for m in sys.modules if m.split(".")[0] == "jaonnx_export")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize(("blocked", "command", "needle"), [
    ("jaonnx_export", "export", "`jaonnx export` needs the export extra, which is not installed"),
    ("jaonnx_export", "twins", "`jaonnx twins` needs the export extra, which is not installed"),
    ("torch", "export", "`jaonnx export` needs the export extra (torch is missing)"),
    ("transformers", "demo", "`jaonnx demo` needs the export extra (transformers is missing)"),
])
def test_a_runtime_only_install_names_the_extra_in_one_line(blocked, command, needle, tmp_path):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"sys.argv = ['jaonnx', {command!r}, {str(tmp_path)!r}, '-o', {str(tmp_path / 'out')!r}]\n"
            "from jaonnx.cli import main; main()\n")
    if command != "export":  # twins takes OUT_DIR only; demo takes options only
        code = code.replace(", '-o', " + repr(str(tmp_path / "out")), "")
    if command == "demo":
        code = code.replace(f", {str(tmp_path)!r}", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, needle, "pip install 'jaonnx[cpu,export]'")


def test_the_gpt2_adapter_picks_the_kv_layout():
    """Static by default; a config GroupQueryAttention cannot take falls back to concat with a
    progress line when defaulted, and is a one-line error when static was asked for."""
    from transformers import GPT2Config

    from jaonnx_export import architectures

    gpt2, bert = architectures.adapter_for("GPT2LMHeadModel"), architectures.adapter_for("BertForMaskedLM")
    fits, odd = GPT2Config(n_embd=64, n_head=4), GPT2Config(n_embd=36, n_head=3)  # head_dim 16 / 12
    lines: list[str] = []
    assert gpt2.kv_layout(fits, None, lines.append) == "static" and lines == []
    assert gpt2.kv_layout(fits, "concat", lines.append) == "concat"
    assert gpt2.kv_layout(odd, None, lines.append) == "concat"
    assert lines == ["head_dim 12 is not a multiple of 8, which GroupQueryAttention needs: using the concat KV cache"]
    with pytest.raises(JaonnxError, match="head_dim 12 is not a multiple of 8.*: export with --kv-cache concat"):
        gpt2.kv_layout(odd, "static", lines.append)
    static, concat = gpt2.graph_io(fits, "static"), gpt2.graph_io(fits, "concat")
    assert not static.fusable and static.decoder.kv_layout == "static" and "seqlens_k" in static.inputs
    assert concat.fusable and concat.decoder.kv_layout == "concat" and "attention_mask" in concat.inputs
    assert bert.kv_layout(None, None, lines.append) is None
    with pytest.raises(JaonnxError, match="--kv-cache applies to text-generation models, not fill-mask"):
        bert.kv_layout(None, "static", lines.append)
