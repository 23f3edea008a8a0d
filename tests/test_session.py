"""Provider choice and session defaults (no GPU needed: CUDA is absent on CI machines)."""

from __future__ import annotations

import pytest
from helpers import assert_one_line_error, jaonnx_cli

import jaonnx
from jaonnx.errors import JaonnxError
from jaonnx.session import default_threads, resolve_providers

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_prefers_cuda_and_falls_back_to_cpu():
    assert resolve_providers("auto", WITH_CUDA) == WITH_CUDA
    assert resolve_providers("auto", CPU_ONLY) == CPU_ONLY
    assert resolve_providers(None, CPU_ONLY) == CPU_ONLY


def test_explicit_cuda_without_it_is_an_error_that_says_what_to_install():
    with pytest.raises(JaonnxError, match=r"jaonnx\[gpu\]"):
        resolve_providers("cuda", CPU_ONLY)


def test_explicit_cuda_keeps_cpu_as_fallback_for_missing_ops():
    assert resolve_providers("cuda", WITH_CUDA) == WITH_CUDA
    assert resolve_providers(["CPUExecutionProvider"], CPU_ONLY) == CPU_ONLY


def test_cuda_on_the_command_line_without_a_gpu(artifacts):
    import onnxruntime

    proc = jaonnx_cli("fill-mask", str(artifacts["ken11-albert"]), "[MASK]です", "--providers", "cuda")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert proc.returncode == 0, proc.stderr  # a GPU machine: CUDA simply works
    else:
        assert_one_line_error(proc, "CUDAExecutionProvider", "jaonnx[gpu]")


def test_threads_override(monkeypatch):
    monkeypatch.setenv("JAONNX_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("JAONNX_THREADS", "many")
    with pytest.raises(JaonnxError, match="JAONNX_THREADS"):
        default_threads()
    monkeypatch.delenv("JAONNX_THREADS")
    assert default_threads() >= 1


def test_session_options_reach_onnxruntime(artifacts):
    fm = jaonnx.load(artifacts["ken11-albert"], providers="cpu", intra_op_threads=1)
    assert fm.session.get_providers() == CPU_ONLY
    assert fm.session.get_session_options().intra_op_num_threads == 1


def test_optimized_graph_is_cached_at_first_load(artifacts, tmp_path, monkeypatch):
    """The first CPU session writes ORT's optimized graph to the cache; the next one loads it
    with graph optimizations off, and computes the same logits."""
    import shutil

    import numpy as np
    import onnxruntime as ort

    from jaonnx.session import create_session

    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts["rinna-roberta"], artifact)
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "cache"))
    feed = {"input_ids": np.array([[5, 6, 7, 8]], dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64),
            "mask_positions": np.array([[1, 2]], dtype=np.int64)}
    first = create_session(artifact / "model.onnx", providers="cpu")
    assert first.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graphs = list((tmp_path / "cache").glob("*/model.onnx"))
    assert len(graphs) == 1 and not list((tmp_path / "cache").glob("*/.*.model.onnx"))
    second = create_session(artifact / "model.onnx", providers="cpu")
    assert second.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_allclose(second.run(None, feed)[0], first.run(None, feed)[0], rtol=1e-5, atol=1e-5)

    # A re-exported model (new mtime) is a new cache entry, never the stale graph.
    (artifact / "model.onnx").touch()
    assert create_session(artifact / "model.onnx", providers="cpu").get_session_options().graph_optimization_level \
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert len(list((tmp_path / "cache").glob("*/model.onnx"))) == 2

    # Off, or explicitly not cached: nothing is written.
    monkeypatch.setenv("JAONNX_CACHE_DIR", "off")
    create_session(artifact / "model.onnx", providers="cpu")
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(tmp_path / "other"))
    create_session(artifact / "model.onnx", providers="cpu", cache=False)
    assert not (tmp_path / "other").exists()


def test_unwritable_cache_still_loads(artifacts, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JAONNX_CACHE_DIR", str(blocker / "cache"))
    fm = jaonnx.load(artifacts["ken11-albert"], providers="cpu")
    assert fm("[MASK]です", top_k=2)


@pytest.mark.parametrize("dists, warns", [
    (["onnxruntime-1.32.0", "onnxruntime_genai-0.18.0"], False),
    (["onnxruntime-1.32.0", "onnxruntime_gpu-1.32.0"], True),
])
def test_both_onnxruntime_wheels_are_found_without_importlib_metadata(tmp_path, monkeypatch, dists, warns):
    """The CPU and GPU wheels share one `onnxruntime/` folder; their metadata beside it says which
    are installed (read as a folder listing: importlib.metadata would cost the cold start ~12 ms)."""
    import sys
    import types
    import warnings

    from jaonnx import session

    (tmp_path / "onnxruntime").mkdir()
    for name in dists:
        (tmp_path / f"{name}.dist-info").mkdir()
    fake = types.ModuleType("onnxruntime")
    fake.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    expected = {"onnxruntime", "onnxruntime-gpu"} if warns else {"onnxruntime"}
    assert session.ort_distributions(fake) == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert session.import_ort() is fake
    assert any("both onnxruntime and onnxruntime-gpu" in str(w.message) for w in caught) == warns


def test_physical_cores_come_from_sysfs_and_agree_with_psutil():
    """The default thread count reads sysfs (no psutil import on a cold start) and counts what
    psutil counts: one thread per physical core."""
    import os
    import subprocess
    import sys

    import psutil

    from jaonnx.session import physical_cores

    assert physical_cores(set(range(os.cpu_count()))) == psutil.cpu_count(logical=False)
    assert physical_cores({10**6}) is None  # a CPU sysfs does not list
    code = "import sys; from jaonnx.session import default_threads; default_threads(); print('psutil' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "JAONNX_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.stdout.strip() == "False", proc.stderr
