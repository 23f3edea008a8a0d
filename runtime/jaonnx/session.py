"""ONNX Runtime session creation: provider choice, threads, clear install errors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import ort_cache
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
    if len(ort_distributions(onnxruntime)) == 2:
        warnings.warn(
            "both onnxruntime and onnxruntime-gpu are installed and the CPU one may shadow CUDA: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'jaonnx[gpu]'",
            stacklevel=2,
        )
    return onnxruntime


def ort_distributions(ort: Any) -> set[str]:
    """Which of onnxruntime and onnxruntime-gpu are installed beside the imported package (both
    write the same `onnxruntime/` folder). A listing of that folder's parent, not importlib.metadata:
    importing it and scanning sys.path cost ~12 ms of a ~0.3 s cold start, on every process."""
    found = set()
    for info in Path(ort.__file__).resolve().parent.parent.glob("onnxruntime*.dist-info"):
        name = info.name.split("-", 1)[0].lower().replace("_", "-")
        if name in ("onnxruntime", "onnxruntime-gpu"):
            found.add(name)
    return found


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
    cpus = set(range(os.cpu_count() or 1))
    try:
        cpus = set(os.sched_getaffinity(0)) or cpus
    except (AttributeError, OSError):
        pass
    count = physical_cores(cpus)
    if count is None:  # not Linux: psutil (optional) knows the machine's physical cores
        count = len(cpus)
        try:
            import psutil

            count = min(count, psutil.cpu_count(logical=False) or count)
        except ImportError:
            pass
    return max(1, count)


def physical_cores(cpus: set[int]) -> int | None:
    """Physical cores among the logical `cpus`: one per distinct set of hyper-thread siblings in
    Linux's sysfs (None where it is absent). Reading sysfs costs well under a millisecond;
    importing psutil for it cost ~10 ms of every cold start."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(cores) or None


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


# ---- the ORT-optimized graph, cached at first load (ort_cache.py keeps the cache bounded) -----

optimized_cache_dir = ort_cache.cache_root
optimized_cache_path = ort_cache.entry_path


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
    if auto and "CUDAExecutionProvider" not in available and "onnxruntime-gpu" in ort_distributions(ort):
        warnings.warn("onnxruntime-gpu is installed but offers no CUDA provider: running on CPU", stacklevel=2)
    with_options = [(p, _provider_options(p, cuda_graph)) for p in chosen]
    load_path = Path(model_path)
    cached = scratch = None
    if cache and chosen == ["CPUExecutionProvider"] and optimization != "none" and load_path.is_file():
        cached = ort_cache.entry_path(load_path, optimization, chosen, ort.__version__)
    if cached is not None and cached.is_file():
        load_path = cached  # already optimized: skip ORT's graph passes
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort_cache.touch(cached)
    elif cached is not None:
        limit = ort_cache.max_bytes()  # a bad $JAONNX_CACHE_MAX_SIZE fails before the slow load
        try:
            scratch = ort_cache.scratch_dir(cached)
            options.optimized_model_filepath = str(scratch / ort_cache.GRAPH)
            # ORT warns that a level-99 graph is for this machine only: the cache key says so.
            options.log_severity_level = max(options.log_severity_level, 3)
            # Weights go to one external file beside it (graphs > 2 GB can be cached too; ORT
            # memory-maps external data at load; and it can be a hard link to the artifact's).
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             ort_cache.WEIGHTS)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        except OSError:
            cached = None  # read-only home: run without the cache
    try:
        session = ort.InferenceSession(str(load_path), sess_options=options, providers=with_options)
    except Exception as exc:  # corrupt or truncated model files
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        if scratch is not None:
            ort_cache.discard(scratch)
        raise JaonnxError(f"cannot load {model_path}: {first}; re-run `jaonnx export`") from None
    if scratch is not None and cached is not None:
        ort_cache.publish(scratch, cached, Path(model_path), limit)
    if "CUDAExecutionProvider" in chosen and session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT falls back silently when the CUDA libraries or the GPU are missing.
        if not auto:
            raise JaonnxError(
                "CUDA was asked for but could not be initialised (no GPU, driver or CUDA/cuDNN libraries): "
                "check `nvidia-smi` and the onnxruntime-gpu CUDA requirements, or use providers='auto'"
            )
        warnings.warn("CUDA is not usable here (no GPU or CUDA libraries): running on CPU", stacklevel=2)
    return session
