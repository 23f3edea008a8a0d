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
