"""Whether ONNX Runtime's CPU graph passes would change an artifact's graph.

Why: the runtime caches ORT's optimized graph (runtime/jaonnx/ort_cache.py) because ORT's passes
take seconds on a traced graph. A graph already at their fixed point gains nothing from that
cache, and an entry costs a second copy of the weights on disk plus a first load that writes it
(GPT-2 small int4: 0.8 s on the first load ever against 0.3 s later). The static decoder graph
is built from ORT's fused contrib ops node by node; what ORT would still fuse in it at load is
fused once at export (apply_ort_passes), so its fp32/int8/int4 graphs come out of level "all"
unchanged. The exporter checks and records the answer in the manifest (`ort_fixed_point`); the
runtime then loads such an artifact as it is, with no cache entry.

The check runs ORT's passes for this machine's CPU. Level "all"'s CPU-specific passes rewrite
convolutions' layouts, which these models do not have, so the answer carries to other x86
machines; where it did not, the runtime would still optimize at load (it never lowers the
level), only without caching the result.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def ort_fixed_point(model_path: Path) -> bool:
    """True when an ORT CPU session at level "all" leaves `model_path`'s graph as it is: the
    same nodes (domain, op, outputs). Inputs may differ: ORT shares equal small constants
    between nodes (ConstantSharing), which saves nothing worth a cached copy."""
    import onnx

    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".fixed-point-") as tmp:
        optimized = _optimized(model_path, "all", Path(tmp), "weights.data")
        before = _signature(onnx.load(str(model_path), load_external_data=False))
        after = _signature(onnx.load(str(optimized), load_external_data=False))
    return before == after


def apply_ort_passes(model_path: Path, data_file: str | None) -> bool:
    """Replace the graph at `model_path` (and its `data_file`) by ORT's own optimization of it at
    level "extended" (constant folding and fusions, no hardware-specific layouts) when that
    changes it; returns whether it did.

    Why: a CPU session applies these passes at every load anyway, so the artifact's numbers do
    not change (the parity and quality checks ran in sessions that applied them); done once
    here, the graph is at ORT's fixed point and loads with no cache entry. The static decoder
    (built node by node) needs it when a plain Add + LayerNormalization is left for ORT to fuse."""
    import onnx

    from .onnx_files import DATA_FILE, MODEL_FILE, save

    if model_path.name != MODEL_FILE or data_file not in (None, DATA_FILE):
        raise ValueError(f"apply_ort_passes rewrites an artifact's {MODEL_FILE} (+ {DATA_FILE}), not {model_path}")
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".ort-passes-") as tmp:
        optimized = _optimized(model_path, "extended", Path(tmp), "ort.data" if data_file else None)
        before = _signature(onnx.load(str(model_path), load_external_data=False))
        if _signature(onnx.load(str(optimized), load_external_data=False)) == before:
            return False
        # Rewritten by the exporter's own writer: one data file, page-aligned (ORT aligns only large tensors).
        save(optimized, model_path.parent, "always" if data_file else "never")
    return True


def _optimized(model_path: Path, level: str, folder: Path, data_file: str | None) -> Path:
    """ORT's optimized form of `model_path` at `level`, written to `folder` (weights in
    `data_file` there, or inline when None)."""
    from jaonnx.session import import_ort

    ort = import_ort()
    optimized = folder / model_path.name
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, {
        "all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED"}[level])
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # its "level 99 graph is for this machine" warning: see the docstring
    options.add_session_config_entry("session.disable_prepacking", "1")  # kernels' layouts: not the graph's
    options.optimized_model_filepath = str(optimized)
    if data_file:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    del session
    return optimized


def _signature(model: Any) -> Counter:
    return Counter((n.domain or "ai.onnx", n.op_type, tuple(n.output)) for n in model.graph.node)
