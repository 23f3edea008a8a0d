"""ORT's per-operator profile (a Chrome trace of every node run) summarised as the top operator
types by time: how the KV-cache Concat cost was found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def summarize_profile(trace: str | Path | list[dict[str, Any]], top: int = 10) -> list[dict[str, Any]]:
    """[{op, ms, share, calls}] for the `top` operator types by total kernel time."""
    events = json.loads(Path(trace).read_text()) if not isinstance(trace, list) else trace
    by_op: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op.setdefault(op, []).append(float(e.get("dur", 0)) / 1000)
    total = sum(sum(v) for v in by_op.values()) or 1.0
    rows = [{"op": op, "ms": sum(v), "share": sum(v) / total, "calls": len(v)} for op, v in by_op.items()]
    return sorted(rows, key=lambda r: r["ms"], reverse=True)[:top]
