"""ONNX Runtime session creation: provider choice, threads, clear install errors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import JaonnxError

Providers = str | Sequence[str] | None

_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def import_ort() -> Any:
    """Import onnxruntime, or say exactly what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise JaonnxError(
            "onnxruntime is not installed: pip install 'jaonnx[cpu]' (or 'jaonnx[gpu]' for CUDA)"
        ) from None
    installed = {d for d in ("onnxruntime", "onnxruntime-gpu") if _has_dist(d)}
    if len(installed) == 2:
        warnings.warn(
            "both onnxruntime and onnxruntime-gpu are installed and the CPU one may shadow CUDA: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'jaonnx[gpu]'",
            stacklevel=2,
        )
    return onnxruntime


def _has_dist(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def resolve_providers(providers: Providers, available: Sequence[str]) -> list[str]:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', or explicit provider names."""
    if providers is None or providers == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    wanted = [providers] if isinstance(providers, str) else list(providers)
    names = [_ALIASES.get(p.lower(), p) for p in wanted]
    missing = [p for p in names if p not in available]
    if missing:
        raise JaonnxError(
            f"{', '.join(missing)} not available in this onnxruntime (has {', '.join(available)}): "
            "install 'jaonnx[gpu]' for CUDA, or use providers='auto'"
        )
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return names


def default_threads() -> int:
    """Physical cores where known: hyper-threads slow matrix kernels down."""
    count = os.cpu_count() or 1
    try:
        import psutil  # optional

        count = psutil.cpu_count(logical=False) or count
    except ImportError:
        pass
    return max(1, count)


def create_session(
    model_path: str | Path,
    providers: Providers = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int = 1,
    optimization: str = "all",
    profile: bool = False,
) -> Any:
    ort = import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or default_threads()
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.enable_profiling = profile
    chosen = resolve_providers(providers, ort.get_available_providers())
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
    except Exception as exc:  # corrupt or truncated model files
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise JaonnxError(f"cannot load {model_path}: {first}; re-run `jaonnx export`") from None
