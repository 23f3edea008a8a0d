"""The `jaonnx bench` command: a rich table, or JSON with --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import JaonnxError


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise JaonnxError(f"--batches takes comma-separated integers such as 1,8, not {text!r}") from None
    return batches


def _fmt(s: dict[str, Any] | None, unit: str = "") -> str:
    if not s:
        return "—"
    return f"{s['median']:.3g} {unit} (±{s['spread'] * 50:.0f}%, n={s['n']})".replace("  ", " ")


def table(r: dict[str, Any]) -> Table:
    where = f"{r['threads']} threads" if r.get("providers", "CPUExecutionProvider") == "CPUExecutionProvider" \
        else r["providers"]
    t = Table(title=f"jaonnx bench {r['artifact']} ({r['recipe']}, {r['precision']}, {where})")
    t.add_column("measurement")
    t.add_column("value (median, ±half spread, rounds)")
    if r["task"] == "text-generation":
        c = r["context"]
        t.add_row(f"time to first token, {c}-token prompt", _fmt(r["ttft_ms"], "ms"))
        t.add_row(f"decode per token, batch 1, context {c}", _fmt(r["decode_ms_per_token"], "ms"))
        t.add_row("  same graph, bare ORT loop", _fmt(r["bare_loop_ms_per_token"], "ms"))
        t.add_row("  work outside the graph", _fmt(r["overhead_ms_per_token"], "ms"))
        for b, s in r["tokens_per_s"].items():
            t.add_row(f"greedy tokens/s, batch {b}", _fmt(s, "tok/s"))
        if r["floor_ms_per_token"] is not None:  # CPU runs only: the floor is host memory bandwidth
            t.add_row("floor (bytes read per token / bandwidth)",
                      f"{r['floor_ms_per_token']:.2f} ms ({(r['weight_bytes'] + r['kv_bytes']) / 1e6:.0f} MB at "
                      f"{r['bandwidth_gbs']:.1f} GB/s)")
            t.add_row("decode / floor", f"{r['floor_ratio']:.2f}×")
    else:
        for seq, s in r["latency_ms"].items():
            t.add_row(f"fill-mask latency, batch 1, {seq} tokens", _fmt(s, "ms"))
        for b, s in r["texts_per_s"].items():
            t.add_row(f"texts/s, batch {b}", _fmt(s, "texts/s"))
        if r["bandwidth_gbs"] is not None:
            t.add_row("memory read bandwidth", f"{r['bandwidth_gbs']:.1f} GB/s")
    t.add_row(f"peak RSS (load + run at batch {r.get('peak_rss_batch', '?')}, own process)",
              f"{r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "—")
    return t


def profile_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="ORT profile: top operators by kernel time")
    for col in ("operator", "ms", "share", "calls"):
        t.add_column(col)
    for row in rows:
        t.add_row(row["op"], f"{row['ms']:.1f}", f"{row['share'] * 100:.1f}%", str(row["calls"]))
    return t


def bench(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory from `jaonnx export`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Also summarise ORT's per-operator profile.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")] = None,
    batches: Annotated[str, typer.Option(help="Batch sizes for throughput, comma-separated.")] = "1,8",
    context: Annotated[int, typer.Option(help="Decoders: prompt length in tokens.")] = 64,
    new_tokens: Annotated[int, typer.Option("--new-tokens", "-n", help="Decoders: tokens generated per run.")] = 32,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each number is their median.")] = 3,
    providers: Annotated[str, typer.Option(help="cpu | cuda: where to run (cuda needs onnxruntime-gpu and a GPU).")] = "cpu",
) -> None:
    """Measure an artifact on this machine: latency, tokens/s at batch 1 and 8, peak RSS, floor ratio."""
    from .artifact import bench_artifact

    err = Console(stderr=True)
    if not (artifact / "jaonnx.json").is_file():
        raise JaonnxError(f"{artifact} is not an artifact directory (no jaonnx.json): run `jaonnx export` first")
    if providers not in ("cpu", "cuda"):
        raise JaonnxError(f"--providers must be cpu or cuda, not {providers!r}")
    result = bench_artifact(artifact, threads=threads, batches=_parse_batches(batches), context=context,
                            new_tokens=new_tokens, rounds=rounds, profile=profile,
                            log=lambda m: err.print(f"[dim]{m}[/dim]"), providers=providers)
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        return
    out = Console()
    out.print(table(result))
    if profile:
        out.print(profile_table(result["profile"]))
