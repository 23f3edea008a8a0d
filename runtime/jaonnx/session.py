"""ONNX Runtime session creation: provider choice, threads, clear install errors."""

from __future__ import annotations

import hashlib
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
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', or explicit provider names.

    An explicit provider that this onnxruntime lacks is an error; 'auto' never fails."""
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
    """Physical cores where known (hyper-threads slow matrix kernels down), within the CPU
    affinity mask (containers), overridable with JAONNX_THREADS."""
    env = os.environ.get("JAONNX_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise JaonnxError(f"JAONNX_THREADS must be an integer, not {env!r}") from None
    count = os.cpu_count() or 1
    try:
        count = len(os.sched_getaffinity(0)) or count
    except (AttributeError, OSError):
        pass
    try:
        import psutil  # optional

        physical = psutil.cpu_count(logical=False)
        if physical:
            count = min(count, physical)
    except ImportError:
        pass
    return max(1, count)


_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _provider_options(name: str, cuda_graph: bool = False) -> dict[str, str]:
    """CUDA: grow the arena by what is asked (not powers of two), heuristic conv search, and
    SkipLayerNormalization's strict kernel (mean and variance accumulated in fp32: the fp16
    static decoder keeps its LayerNorms in fp16). `cuda_graph` lets runs be captured as CUDA
    graphs (see generation/cuda_graphs.py)."""
    if name == "CUDAExecutionProvider":
        return {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
                "enable_skip_layer_norm_strict_mode": "1", "enable_cuda_graph": "1" if cuda_graph else "0"}
    return {}


# ---- the ORT-optimized graph, cached at first load ---------------------------------------------

_CACHE_ENV = "JAONNX_CACHE_DIR"  # where optimized graphs go; "off" disables the cache


def optimized_cache_dir() -> Path | None:
    """$JAONNX_CACHE_DIR, else $XDG_CACHE_HOME/jaonnx/ort, else ~/.cache/jaonnx/ort; None when off."""
    env = os.environ.get(_CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "jaonnx" / "ort"


def _cpu_signature() -> str:
    """The CPU features an ORT-optimized graph may depend on (its level-99 layout passes)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return " ".join(sorted(set(flags.split(":", 1)[-1].split())))


def optimized_cache_path(model_path: Path, level: str, providers: Sequence[str], ort_version: str) -> Path | None:
    """Where the optimized form of `model_path` is cached: keyed by the model files (size,
    mtime), the ORT version, the providers, the optimization level and the CPU's features."""
    root = optimized_cache_dir()
    if root is None:
        return None
    parts = [str(model_path.resolve()), ort_version, level, ",".join(providers), _cpu_signature()]
    for path in [model_path, *sorted(model_path.parent.glob(model_path.name + ".data"))]:
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return root / key / "model.onnx"


def create_session(
    model_path: str | Path,
    providers: Providers = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int = 1,
    optimization: str = "all",
    profile: bool = False,
    *,
    cpu_arena: bool = True,
    memory_pattern: bool = True,
    spinning: bool | None = None,
    config: dict[str, str] | None = None,
    cache: bool = True,
    cuda_graph: bool = False,
) -> Any:
    """An InferenceSession with the runtime's defaults: all graph optimizations, one intra-op
    thread per physical core, sequential execution, the CPU arena on. `config` adds raw ORT
    session config entries; `spinning=False` stops idle worker threads from busy-waiting
    (useful when the machine is shared with other processes). On CPU the optimized graph is
    cached at first load (see optimized_cache_path) and later sessions load it without
    re-optimizing; `cache=False` or JAONNX_CACHE_DIR=off turns that off. `cuda_graph` turns on
    ORT's CUDA graph capture on the CUDA provider (ignored elsewhere)."""
    ort = import_ort()
    if optimization not in _LEVELS:
        raise JaonnxError(f"optimization must be one of {', '.join(_LEVELS)}, not {optimization!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or default_threads()
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    options.enable_profiling = profile
    options.enable_cpu_mem_arena = cpu_arena
    options.enable_mem_pattern = memory_pattern
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    available = ort.get_available_providers()
    chosen = resolve_providers(providers, available)
    auto = providers is None or providers == "auto"
    if auto and "CUDAExecutionProvider" not in available and _has_dist("onnxruntime-gpu"):
        warnings.warn("onnxruntime-gpu is installed but offers no CUDA provider: running on CPU", stacklevel=2)
    with_options = [(p, _provider_options(p, cuda_graph)) for p in chosen]
    load_path = Path(model_path)
    cached = None
    if cache and chosen == ["CPUExecutionProvider"] and optimization != "none" and load_path.is_file():
        cached = optimized_cache_path(load_path, optimization, chosen, ort.__version__)
    if cached is not None and cached.is_file():
        load_path = cached  # already optimized: skip ORT's graph passes
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            scratch = cached.with_name(f".{os.getpid()}.model.onnx")
            options.optimized_model_filepath = str(scratch)
            # ORT warns that a level-99 graph is for this machine only: the cache key says so.
            options.log_severity_level = max(options.log_severity_level, 3)
            # Weights go to one external file beside it, so graphs > 2 GB can be cached too.
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             scratch.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        except OSError:
            cached = None  # read-only home: run without the cache
    try:
        session = ort.InferenceSession(str(load_path), sess_options=options, providers=with_options)
    except Exception as exc:  # corrupt or truncated model files
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise JaonnxError(f"cannot load {model_path}: {first}; re-run `jaonnx export`") from None
    if cached is not None and load_path != cached:
        _publish(cached.with_name(f".{os.getpid()}.model.onnx"), cached)
    if "CUDAExecutionProvider" in chosen and session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT falls back silently when the CUDA libraries or the GPU are missing.
        if not auto:
            raise JaonnxError(
                "CUDA was asked for but could not be initialised (no GPU, driver or CUDA/cuDNN libraries): "
                "check `nvidia-smi` and the onnxruntime-gpu CUDA requirements, or use providers='auto'"
            )
        warnings.warn("CUDA is not usable here (no GPU or CUDA libraries): running on CPU", stacklevel=2)
    return session


def _publish(scratch: Path, cached: Path) -> None:
    """Move a freshly written optimized graph into place (data file first, then the graph, so
    a reader never finds a graph without its weights); a concurrent writer's copy is as good."""
    data = scratch.with_name(scratch.name + ".data")
    try:
        if data.exists():
            os.replace(data, cached.with_name(scratch.name + ".data"))
        os.replace(scratch, cached)
    except OSError:
        pass
