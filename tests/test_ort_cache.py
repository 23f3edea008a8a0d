"""The ORT optimized-graph cache: same logits as a cold load, weights shared with the artifact,
a bounded size (LRU), and `jaonnx cache` to see and empty it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, jaonnx_cli

from jaonnx import ort_cache
from jaonnx.artifact import read_manifest
from jaonnx.errors import JaonnxError
from jaonnx.session import create_session


def _feed(session, manifest) -> dict[str, np.ndarray]:
    """Fixed inputs for either task: a 6-token text (fill-mask) or one decode step after 6 cached tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (1, 6), dtype=np.int64)
    if manifest.task != "text-generation":
        return {"input_ids": ids, "attention_mask": np.ones((1, 6), dtype=np.int64),
                "mask_positions": np.array([[2]], dtype=np.int64)}
    shape = manifest.decoder
    feed = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 7), dtype=np.int64),
            "position_ids": np.array([[6]], dtype=np.int64), "logits_to_keep": np.array([1], dtype=np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = rng.standard_normal((1, shape.num_heads, 6, shape.head_dim)).astype(np.float32)
    return feed


def _copy(artifact: Path, to: Path) -> Path:
    shutil.copytree(artifact, to)
    return to / "model.onnx"


@pytest.mark.parametrize("recipe", ["rinna-gpt-1b", "ken11-albert"])  # external data / weights inside the graph
def test_cached_load_gives_the_logits_of_a_cold_load(artifacts, tmp_path, monkeypatch, recipe):
    """The cached graph (weights memory-mapped from the external file) computes exactly what a
    session that optimizes the original graph at load computes."""
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy(artifacts[recipe], tmp_path / "artifact")
    manifest = read_manifest(model.parent)
    cold = create_session(model, providers="cpu", intra_op_threads=1, cache=False)
    feed = _feed(cold, manifest)
    expected = cold.run(None, feed)[0]
    create_session(model, providers="cpu", intra_op_threads=1)  # writes the entry
    cached = create_session(model, providers="cpu", intra_op_threads=1)
    assert cached._model_path.startswith(str(tmp_path / "cache"))  # really the cached graph
    np.testing.assert_array_equal(cached.run(None, feed)[0], expected)


def test_the_artifact_stays_loadable_by_onnx_after_its_entry_is_written(artifacts, tmp_path, monkeypatch):
    """The entry keeps its own weights: a hard link to model.onnx.data would make `onnx.load`
    refuse the user's artifact as a possible hardlink attack."""
    import onnx

    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy(artifacts["rinna-gpt-1b"], tmp_path / "artifact")
    create_session(model, providers="cpu", intra_op_threads=1)
    (entry,) = ort_cache.entries()
    data = model.with_name("model.onnx.data")
    assert data.stat().st_nlink == 1 and not os.path.samefile(Path(entry.path) / ort_cache.WEIGHTS, data)
    assert entry.model == str(model.resolve())
    onnx.load(str(model))  # raises on a data file with several hard links


def test_pruning_keeps_the_bound_and_the_recently_used(artifacts, tmp_path, monkeypatch):
    """Three artifacts, room for two: the least recently used entry goes (a cache hit counts as use)."""
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    models = [_copy(artifacts["ken11-albert"], tmp_path / name) for name in "abc"]
    create_session(models[0], providers="cpu", intra_op_threads=1)
    (first,) = ort_cache.entries()
    bound = int(first.own_bytes * 2.5)
    monkeypatch.setenv(ort_cache.SIZE_ENV, str(bound))
    create_session(models[1], providers="cpu", intra_op_threads=1)
    os.utime(Path(ort_cache.entries()[-1].path), (1, 1))  # b's entry: long unused
    create_session(models[0], providers="cpu", intra_op_threads=1)  # a: a hit, now most recent
    create_session(models[2], providers="cpu", intra_op_threads=1)
    kept = ort_cache.entries()
    assert sum(e.own_bytes for e in kept) <= bound
    assert sorted(Path(e.model).parent.name for e in kept) == ["a", "c"]
    # A bound of 0 keeps only the entry just written.
    monkeypatch.setenv(ort_cache.SIZE_ENV, "0")
    create_session(_copy(artifacts["ken11-albert"], tmp_path / "d"), providers="cpu", intra_op_threads=1)
    assert [Path(e.model).parent.name for e in ort_cache.entries()] == ["d"]


def test_sizes_parse_and_a_bad_one_names_its_field(artifacts, tmp_path, monkeypatch):
    assert ort_cache.parse_size("4G") == 4 * 2**30
    assert ort_cache.parse_size("500M") == 500 * 2**20
    assert ort_cache.parse_size("1.5k") == 1536
    assert ort_cache.parse_size("0") == 0
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(ort_cache.SIZE_ENV, "lots")
    with pytest.raises(JaonnxError, match=ort_cache.SIZE_ENV):
        create_session(artifacts["ken11-albert"] / "model.onnx", providers="cpu")
    assert not list((tmp_path / "cache").glob("*"))  # failed before writing anything


def test_cache_command_lists_prunes_and_clears(artifacts, tmp_path):
    env = {"JAONNX_CACHE_DIR": str(tmp_path / "cache")}
    for name in "ab":
        model = _copy(artifacts["ken11-albert"], tmp_path / name)
        proc = jaonnx_cli("fill-mask", str(model.parent), "[MASK]です", env=env)
        assert proc.returncode == 0, proc.stderr
    listed = json.loads(jaonnx_cli("cache", "list", env=env).stdout)
    assert listed["count"] == 2 and listed["root"] == str(tmp_path / "cache")
    assert listed["own_bytes"] == sum(e["own_bytes"] for e in listed["entries"]) > 0
    pruned = json.loads(jaonnx_cli("cache", "prune", "--max-size", str(listed["own_bytes"] - 1), env=env).stdout)
    assert pruned["deleted"]["count"] == 1 and pruned["kept"]["count"] == 1
    assert pruned["kept"]["entries"][0]["key"] == listed["entries"][1]["key"]  # the more recent one stays
    cleared = json.loads(jaonnx_cli("cache", "clear", env=env).stdout)
    assert cleared["deleted"]["count"] == 1
    assert json.loads(jaonnx_cli("cache", "list", env=env).stdout)["count"] == 0
    assert_one_line_error(jaonnx_cli("cache", "prune", "--max-size", "big", env=env), "--max-size")
    assert_one_line_error(jaonnx_cli("cache", "list", env={**env, ort_cache.SIZE_ENV: "x"}), ort_cache.SIZE_ENV)


# ---- graphs already at ORT's fixed point load as they are (no cache entry, weights mapped) ----


def _tiny_graph(path: Path, foldable: bool) -> Path:
    """y = x @ W (nothing for ORT to do), or y = x @ (W + W) (ORT folds the constant Add)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    nodes = [helper.make_node("MatMul", ["x", "W2" if foldable else "W"], ["y"], name="mm")]
    if foldable:
        nodes.insert(0, helper.make_node("Add", ["W", "W"], ["W2"], name="add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_fixed_point_check_tells_a_graph_ort_rewrites_from_one_it_leaves(tmp_path):
    """The exporter's check: a foldable constant Add is a graph ORT changes; a bare MatMul is not."""
    from jaonnx_export.ort_fixed_point import ort_fixed_point

    assert ort_fixed_point(_tiny_graph(tmp_path / "plain.onnx", foldable=False)) is True
    assert ort_fixed_point(_tiny_graph(tmp_path / "foldable.onnx", foldable=True)) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foldable.onnx", "plain.onnx"]  # no scratch left


def test_ort_passes_applied_at_export_leave_a_fixed_point_that_computes_the_same(tmp_path):
    """apply_ort_passes bakes in what a session would fold at load: the graph changes once, is
    then at ORT's fixed point, and gives the original graph's output."""
    import onnxruntime as ort

    from jaonnx_export.ort_fixed_point import apply_ort_passes, ort_fixed_point

    model = _tiny_graph(tmp_path / "model.onnx", foldable=True)
    x = {"x": np.arange(4, dtype=np.float32)[None]}
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert apply_ort_passes(model, None) is True
    assert ort_fixed_point(model) is True and apply_ort_passes(model, None) is False
    np.testing.assert_array_equal(ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0],
                                  expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with pytest.raises(ValueError, match="model.onnx"):
        apply_ort_passes(_tiny_graph(tmp_path / "other.onnx", foldable=True), None)


def test_default_export_maps_its_weights_and_a_fixed_point_graph_skips_the_cache(artifacts, tmp_path, monkeypatch):
    """A default export of a decoder with more than a mebibyte of weights puts them in
    model.onnx.data at page-aligned offsets (ORT maps the file), its static graph is recorded as
    ORT's fixed point (checked here again against a session at level "all"), and loading it
    writes no cache entry but gives the logits of a session that optimizes it at load."""
    import onnx

    from jaonnx_export.ort_fixed_point import ort_fixed_point

    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy(artifacts["gpt2-small-ja"], tmp_path / "artifact")
    manifest = read_manifest(model.parent)
    assert manifest.external_data == "model.onnx.data" and manifest.decoder.kv_layout == "static"
    offsets = [int(e.value) for t in onnx.load(str(model), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    assert manifest.ort_fixed_point is True and ort_fixed_point(model) is True
    import jaonnx

    gen = jaonnx.load(model.parent, providers="cpu", intra_op_threads=1)
    assert ort_cache.entries() == [] and not (tmp_path / "cache").exists()
    optimizing = create_session(model, providers="cpu", intra_op_threads=1, cache=False)
    static = {i.name: i for i in optimizing.get_inputs()}
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(5, 200, (1, 6), dtype=np.int64), "position_ids": np.arange(6)[None],
            "seqlens_k": np.array([5], np.int32), "total_sequence_length": np.array(6, np.int32),
            "logits_to_keep": np.array([1], np.int64)}
    d = manifest.decoder
    feed |= {n: np.zeros((1, d.num_heads, 8, d.head_dim), np.float32) for n in static if n.startswith("past")}
    np.testing.assert_array_equal(gen.session.run(["logits"], feed)[0], optimizing.run(["logits"], feed)[0])


def test_a_fixed_point_graph_with_inline_weights_still_uses_the_cache(artifacts, tmp_path, monkeypatch):
    """`--external-data never`: the cache entry is what maps the weights, so it is still written."""
    import onnx

    import jaonnx

    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy(artifacts["gpt2-small-ja"], tmp_path / "artifact")
    onnx.save_model(onnx.load(str(model)), str(model))
    model.with_name("model.onnx.data").unlink()
    manifest = json.loads((model.parent / "jaonnx.json").read_text())
    assert manifest["ort_fixed_point"] is True
    (model.parent / "jaonnx.json").write_text(json.dumps({**manifest, "external_data": None}))
    jaonnx.load(model.parent, providers="cpu", intra_op_threads=1)
    assert len(ort_cache.entries()) == 1


def test_a_graph_ort_rewrites_still_uses_the_cache(artifacts, tmp_path, monkeypatch):
    """A traced encoder is not at ORT's fixed point: its manifest says so and its first load
    writes the optimized graph into the cache (its weights are inline: under a mebibyte)."""
    import jaonnx

    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy(artifacts["ken11-albert"], tmp_path / "artifact")
    assert read_manifest(model.parent).ort_fixed_point is False
    jaonnx.load(model.parent, providers="cpu", intra_op_threads=1)
    assert len(ort_cache.entries()) == 1


def test_a_cold_generate_imports_only_what_it_needs(artifacts):
    """Cold start: loading a decoder and producing a token imports no protobuf classes (the
    tokenizer's no-prefix and exact variants are built on first use), no importlib.metadata (the
    two-wheels check lists a folder) and nothing of the exporter."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, jaonnx
        gen = jaonnx.load({str(artifacts["gpt2-small-ja"])!r}, providers="cpu", intra_op_threads=1)
        gen.generate("今日は", max_new_tokens=1, do_sample=False)
        print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in
                              ("google", "torch", "transformers", "jaonnx_export", "onnx")
                              or m in ("sentencepiece.sentencepiece_model_pb2", "importlib.metadata"))))
        assert gen.tokenizer.backend.encode("です", continuation=True)  # the variant still builds when asked
        assert "sentencepiece.sentencepiece_model_pb2" in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAONNX_CACHE_DIR": "off"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_a_wrong_ort_fixed_point_value_is_a_one_line_error(artifacts, tmp_path):
    import jaonnx

    model = _copy(artifacts["gpt2-small-ja"], tmp_path / "artifact")
    manifest = json.loads((model.parent / "jaonnx.json").read_text())
    (model.parent / "jaonnx.json").write_text(json.dumps({**manifest, "ort_fixed_point": "yes"}))
    with pytest.raises(JaonnxError, match="ort_fixed_point") as info:
        jaonnx.load(model.parent, providers="cpu")
    assert "\n" not in str(info.value)
