"""int8 / fp16 / --optimize exports of the five trained twins, their quality reports, and the
95% top-1 gate (which must fail without --force)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ALL, GPT, export_via_cli, run_cli

PRECISIONS = {"int8": ("--quantize", "int8"), "fp16": ("--dtype", "fp16")}


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "jaonnx.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def converted(twins_dir: Path, cache_dir: Path) -> dict[tuple[str, str], Path]:
    """(recipe, precision) -> artifact exported through the CLI."""
    return {
        (r, p): export_via_cli(twins_dir / r, cache_dir / "precision" / f"{r}-{p}", *flags)
        for r in ALL
        for p, flags in PRECISIONS.items()
    }


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("recipe", ALL)
def test_quality_report_stored_and_passing(converted: dict, recipe: str, precision: str) -> None:
    manifest = _manifest(converted[(recipe, precision)])
    quality = manifest["quality"]
    assert quality["precision"] == precision
    assert quality["passed"] is True
    assert quality["top1_agreement"] >= 0.95
    assert 0 < quality["max_abs_logit_diff"] < 5
    assert quality["texts"] > 10
    assert manifest["quantization"] == ("int8" if precision == "int8" else None)
    assert manifest["dtype"] == ("fp16" if precision == "fp16" else "fp32")


@pytest.mark.parametrize("recipe", ALL)
def test_int8_graph_is_quantized_and_smaller(converted: dict, artifacts: dict, recipe: str) -> None:
    import onnx

    directory = converted[(recipe, "int8")]
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "DynamicQuantizeMatMul" in ops
    # Every product with a weight (lm_head included) is quantized; Q.K^T and attention.V remain.
    fp32_weight_products = [n.name for n in model.graph.node
                            if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert fp32_weight_products == []
    size = (directory / "model.onnx").stat().st_size
    # twins are embedding-heavy (tables stay fp32, lm_head untied), so only "smaller" is promised
    assert size < (artifacts[recipe] / "model.onnx").stat().st_size


@pytest.mark.parametrize("recipe", GPT)
def test_fp16_manifest_dtypes_match_graph_and_generate(converted: dict, recipe: str) -> None:
    import onnxruntime as ort

    directory = converted[(recipe, "fp16")]
    manifest = _manifest(directory)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()} | {o.name: o.type for o in session.get_outputs()}
    for name, dtype in {**manifest["inputs"], **manifest["outputs"]}.items():
        assert types[name] == f"tensor({'float' if dtype == 'float32' else dtype})", name
    assert manifest["outputs"]["logits"] == "float32"
    assert manifest["inputs"]["past_key_values.0.key"] == "float16"
    assert manifest["outputs"]["present.0.key"] == "float16"
    # one cached step in the graph's own dtypes
    shape = manifest["decoder"]
    feed = {
        "input_ids": np.array([[5, 6, 7]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.arange(3, dtype=np.int64)[None],
        "logits_to_keep": np.array([1], dtype=np.int64),
    }
    for name in manifest["inputs"]:
        if name.startswith("past_key_values."):
            feed[name] = np.zeros((1, shape["num_heads"], 0, shape["head_dim"]), dtype=np.float16)
    logits, *present = session.run(None, feed)
    assert logits.dtype == np.float32 and present[0].dtype == np.float16


@pytest.mark.parametrize("recipe", ["rinna-roberta", "gpt2-small-ja"])
def test_int8_artifact_runs_through_the_runtime(converted: dict, recipe: str) -> None:
    import jaonnx

    model = jaonnx.load(converted[(recipe, "int8")], providers="cpu")
    if model.task == "fill-mask":
        assert len(model("大学で[MASK]の研究をしています。", top_k=3)) == 3
    else:
        assert isinstance(model.generate("近年の機械学習は", max_new_tokens=4, do_sample=False), str)


@pytest.mark.parametrize("recipe", ALL)
def test_optimize_reports_its_decision(twins_dir: Path, cache_dir: Path, recipe: str) -> None:
    directory = export_via_cli(twins_dir / recipe, cache_dir / "precision" / f"{recipe}-opt", "--optimize")
    quality = _manifest(directory)["quality"]
    optimization = quality["optimization"]
    assert "applied" in optimization
    assert "fusions" in optimization or "error" in optimization
    if optimization["applied"]:
        assert optimization["cpu_ms"]["optimized"] < optimization["cpu_ms"]["plain"]
    assert quality["top1_agreement"] == pytest.approx(1.0)


def test_gate_fails_without_force_and_passes_with_it(
    twins_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jaonnx_export import precision

    # An unreachable threshold makes the real int8 artifact fail the gate.
    monkeypatch.setattr(precision, "MIN_TOP1_AGREEMENT", 1.01)
    monkeypatch.setattr(precision, "QUALITY_TEXTS", 8)
    src = twins_dir / "rinna-roberta"
    failed = run_cli("export", str(src), "-o", str(tmp_path / "no"), "--quantize", "int8")
    assert failed.exit_code != 0
    assert "top-1 agreement" in str(failed.exception) and "--force" in str(failed.exception)
    assert not (tmp_path / "no" / "jaonnx.json").exists()
    assert not (tmp_path / "no" / "model.onnx").exists()

    forced = run_cli("export", str(src), "-o", str(tmp_path / "yes"), "--quantize", "int8", "--force")
    assert forced.exit_code == 0, forced.output
    quality = _manifest(tmp_path / "yes")["quality"]
    assert quality["passed"] is False and quality["forced"] is True and quality["threshold"] == 1.01


def test_bad_options_are_one_line_errors(twins_dir: Path, tmp_path: Path) -> None:
    for flags in (("--quantize", "int4"), ("--dtype", "bf16"), ("--quantize", "int8", "--dtype", "fp16")):
        result = run_cli("export", str(twins_dir / "rinna-roberta"), "-o", str(tmp_path / "x"), *flags)
        assert result.exit_code != 0
        assert "int8" in str(result.exception) or "fp16" in str(result.exception)


def test_quantize_weight_round_trip() -> None:
    from jaonnx_export.precision import quantize_weight

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    q, scale = quantize_weight(weight, reduce_range=False)
    assert q.dtype == np.int8 and scale.shape == (32,)
    assert np.abs(q.astype(np.float32) * scale - weight).max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("recipe", GPT)
def test_fp16_artifact_generates_through_the_runtime(converted: dict, artifacts: dict, recipe: str) -> None:
    """The runtime feeds an fp16 artifact an fp16 cache; greedy output tracks fp32."""
    import jaonnx

    fp16 = jaonnx.load(converted[(recipe, "fp16")], providers="cpu")
    fp32 = jaonnx.load(artifacts[recipe], providers="cpu")
    assert fp16.decoder.past_dtype == np.float16
    options = dict(max_new_tokens=8, do_sample=False)
    a = fp16.generate("近年の機械学習は", return_ids=True, **options)
    b = fp32.generate("近年の機械学習は", return_ids=True, **options)
    assert len(a.generated_ids) == 8
    assert a.generated_ids[:4] == b.generated_ids[:4]
