"""results dict -> latest.md (table with ratios vs PyTorch and the decode floor), latest.json, PNG plots.

Each engine's result is a list of rounds (one worker process each). A cell is the median over the
rounds with half the min-max spread; the ratio in parentheses is the median of per-round ratios
against PyTorch's run in the same round (interleaved, so a slow minute hits both)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

ENGINES = ["torch", "jaonnx-fp32", "jaonnx-int8", "jaonnx-int4", "optimum", "openvino-fp32", "openvino-int8",
           "ctranslate2-fp32", "ctranslate2-int8", "genai-fp32", "genai-int8"]
LABELS = {"torch": "PyTorch eager", "optimum": "Optimum ORTModel", "jaonnx-fp32": "jaonnx fp32",
          "jaonnx-int8": "jaonnx int8", "jaonnx-int4": "jaonnx int4", "openvino-fp32": "OpenVINO fp32",
          "openvino-int8": "OpenVINO int8", "ctranslate2-fp32": "CTranslate2 fp32",
          "ctranslate2-int8": "CTranslate2 int8", "genai-fp32": "ORT-genai fp32", "genai-int8": "ORT-genai int8"}
SHAPE_OF = {"generation": "gpt2-small", "gpt1b": "gpt-1b"}


def _rounds(r: Any) -> list[dict[str, Any]]:
    """Old single-result files and new per-round lists alike."""
    if isinstance(r, dict):
        return [r]
    return [x for x in (r or []) if isinstance(x, dict) and "error" not in x]


def _values(r: Any, getter: Callable[[Any], float]) -> list[float | None]:
    out: list[float | None] = []
    for x in _rounds(r):
        try:
            out.append(float(getter(x)))
        except (KeyError, TypeError, ValueError):
            out.append(None)
    return out


def _precision(engine: str) -> str:
    return "int4" if "int4" in engine else "int8" if "int8" in engine else "fp32"


class Row:
    def __init__(self, label: str, area: str, getter: Callable[[Any], float], unit: str, higher: bool,
                 context: int | None = None) -> None:
        self.label, self.area, self.getter, self.unit, self.higher, self.context = label, area, getter, unit, higher, context


def rows(results: dict[str, Any]) -> list[Row]:
    p = results.get("params", {})
    out: list[Row] = []
    for seq in p.get("seqs", []):
        out.append(Row(f"fill-mask BERT-base, batch 1, seq {seq}", "fill_mask",
                       lambda r, s=seq: _med(r["latency"][str(s)]), "ms", False))
    for b in p.get("fm_batches", []):
        out.append(Row(f"fill-mask BERT-base throughput, batch {b}", "fill_mask",
                       lambda r, b=b: r["throughput"][str(b)]["texts_per_s"], "texts/s", True))
    for c in p.get("decode", []):
        out.append(Row(f"GPT-2 small first token, {c}-token prompt", "generation",
                       lambda r, c=c: _med(r["prefill"][str(c)]), "ms", False))
    for c in p.get("decode", []):
        out.append(Row(f"GPT-2 small decode per token, context {c}", "generation",
                       lambda r, c=c: _med(r["decode"][str(c)]), "ms", False, context=c))
    for c in p.get("decode", []):
        out.append(Row(f"  same graph in a bare ORT loop, context {c}", "generation",
                       lambda r, c=c: _med(r["bare_decode"][str(c)]), "ms", False, context=c))
        out.append(Row(f"  work outside the graph (generate − bare loop), context {c}", "generation",
                       lambda r, c=c: _med(r["decode"][str(c)]) - _med(r["bare_decode"][str(c)]), "ms", False))
    for b in p.get("gen_batches", []):
        out.append(Row(f"GPT-2 small greedy tokens/s, batch {b}", "generation",
                       lambda r, b=b: r["tokens_per_s"][str(b)]["tokens_per_s"], "tok/s", True))
    out.append(Row("GPT-2 small greedy tokens/s, input-grounded prompt, plain", "generation",
                   lambda r: r["prompt_lookup"]["plain"]["tokens_per_s"], "tok/s", True))
    out.append(Row("GPT-2 small greedy tokens/s, input-grounded prompt, prompt_lookup=10", "generation",
                   lambda r: r["prompt_lookup"]["lookup"]["tokens_per_s"], "tok/s", True))
    for area, label in (("fill_mask", "fill-mask BERT-base"), ("generation", "GPT-2 small")):
        out.append(Row(f"{label} peak RSS during the benchmark", area, lambda r: r["peak_rss_mib"], "MiB", False))
    for c in p.get("decode_1b", []):
        out.append(Row(f"japanese-gpt-1b shape decode per token, context {c}", "gpt1b",
                       lambda r, c=c: _med(r["decode"][str(c)]), "ms", False, context=c))
    out.append(Row("japanese-gpt-1b shape peak RSS (load + decode)", "gpt1b", lambda r: r["peak_rss_mib"], "MiB", False))
    for area, label in (("coldstart_fill_mask", "fill-mask BERT-base"), ("coldstart_generation", "GPT-2 small")):
        out.append(Row(f"cold start {label} (new process → first result)", area, lambda r: r["cold_start_s"], "s", False))
        out.append(Row(f"cold start {label} peak RSS", area, lambda r: r["peak_rss_mib"], "MiB", False))
    return out


def _med(d: dict[str, Any]) -> float:
    return d["median"] if "median" in d else d["p50"]


def floor_ms(results: dict[str, Any], area: str, engine: str, context: int) -> float | None:
    """(weight bytes of the column's precision + KV bytes at `context`) / read bandwidth."""
    bw = results.get("machine", {}).get("read_bandwidth_gbs")
    shape = SHAPE_OF.get(area)
    wb = results.get("weight_bytes", {}).get(shape or "", {}).get(_precision(engine))
    kv = results.get("kv_bytes_per_context_token", {}).get(shape or "", 0) * context
    return (wb + kv) / (bw * 1e9) * 1000 if bw and wb else None


def cell(results: dict[str, Any], row: Row, engine: str) -> str:
    runs = results.get("runs", {}).get(row.area, {})
    if engine not in runs:
        return "unavailable" if engine in results.get("unavailable", {}) else "—"
    raw = runs[engine]
    if not _rounds(raw):
        return "failed"
    values = [v for v in _values(raw, row.getter) if v is not None]
    if not values:
        return "—"
    m = median(values)
    text = f"{m:.1f}" if abs(m) >= 10 else f"{m:.2f}" if abs(m) >= 0.1 else f"{m:.3f}"
    text += f" {row.unit}"
    if len(values) > 1 and m:
        text += f" ±{(max(values) - min(values)) / abs(m) * 50:.0f}%"
    if row.context is not None:
        floor = floor_ms(results, row.area, engine, row.context)
        if floor:
            text += f" · {m / floor:.2f}× floor"
    ref = runs.get("torch")
    if ref is not None and engine != "torch" and row.unit and "outside" not in row.label:
        ratios = [(v / r if row.higher else r / v) for r, v in zip(_values(ref, row.getter), _values(raw, row.getter))
                  if r and v]
        if ratios:
            text += f" ({median(ratios):.2f}×" + (f", {min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else "") + ")"
    return text


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    runs = results.get("runs", {})
    present = {e for area in runs.values() for e in area} | set(results.get("unavailable", {}))
    engines = [e for e in ENGINES if e in present]
    bw = m.get("read_bandwidth_gbs")
    lines = [
        f"# jaonnx benchmarks ({results['mode']})", "",
        f"- CPU: {m['cpu']} ({', '.join(m['isa'])}), {m['logical_cores']} logical cores, {m['memory_mib']} MiB; "
        f"threads used: {results['params']['threads']}"
        + (f"; memory read bandwidth {bw:.1f} GB/s (numpy sum over 512 MiB, best of 5)" if bw else ""),
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; Python {m['python']}",
        "- random weights at the real shapes (tiny shapes in smoke mode). Each cell: the median of "
        f"{results['params'].get('rounds', 1)} interleaved rounds (one fresh process each) ±half their spread; "
        "(ratio) = median of per-round speed-ups (or size/RSS reductions) against PyTorch eager in the same "
        "round, with their range; `× floor` = ms/token over (weight bytes of that precision + KV bytes) / "
        "read bandwidth",
        f"- started {results['started']}, took {results.get('seconds', 0):.0f} s; runs discarded in slow "
        f"windows and measured again: {len(results.get('discarded', []))}", "",
        "| measurement | " + " | ".join(LABELS.get(e, e) for e in engines) + " |",
        "|---|" + "---|" * len(engines),
    ]
    for row in rows(results):
        cells = [cell(results, row, e) for e in engines]
        if all(c in ("—", "unavailable", "failed") for c in cells):
            continue
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    for model, sizes in results.get("sizes", {}).items():
        ref = sizes.get("torch")
        vals = [f"{sizes[e]:.1f} MB" + (f" ({ref / sizes[e]:.2f}×)" if ref and e != "torch" else "")
                if sizes.get(e) else "—" for e in engines]
        lines.append(f"| artifact size {model} (PyTorch column: safetensors) | " + " | ".join(vals) + " |")
    sanity = [x["sanity"] for x in _rounds(runs.get("fill_mask", {}).get("torch")) if "sanity" in x]
    if sanity:
        pipe = median(s["pipeline_ms"]["median"] for s in sanity)
        plain = median(s["plain_forward_ms"]["median"] for s in sanity)
        verdict = "OK" if pipe <= plain * 1.15 else "CHECK: the baseline pipeline is slower than a plain forward"
        lines += ["", f"Baseline sanity (PyTorch fill-mask, seq {sanity[0]['seq']}): pipeline {pipe:.1f} ms vs plain "
                      f"forward {plain:.1f} ms, interleaved in one process, {sanity[0]['torch_threads']} torch threads: {verdict}"]
    missing = [f"- {LABELS.get(e, e)}: {why}" for e, why in results.get("unavailable", {}).items()]
    for engine, rs in runs.get("generation", {}).items():
        why = next((x["prompt_lookup"]["error"] for x in _rounds(rs) if "error" in x.get("prompt_lookup", {})), None)
        if why:
            missing.append(f"- prompt-lookup row ({LABELS.get(engine, engine)}): {why}")
    if missing:
        lines += ["", "## Unavailable columns and rows", *missing]
    fails = [f"- {area} / {LABELS.get(e, e)}: {x['error']}" for area, engs in runs.items() for e, rs in engs.items()
             for x in (rs if isinstance(rs, list) else [rs]) if isinstance(x, dict) and "error" in x]
    if fails:
        lines += ["", "## Failed runs (recorded, not hidden)", *fails]
    if results.get("notes"):
        lines += ["", "## Notes", *[f"- {n}" for n in results["notes"]]]
    if results.get("quality"):
        lines += ["", "## Export quality reports (random weights: top-1 understates int8/fp16 quality)", "",
                  "| artifact | max abs logit diff | top-1 agreement |", "|---|---|---|"]
        for name, q in results["quality"].items():
            lines.append(f"| {name} | {q.get('max_abs_logit_diff', float('nan')):.3g} | {q.get('top1_agreement', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    runs = results.get("runs", {})
    seqs = results["params"].get("seqs", [])
    if runs.get("fill_mask") and seqs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for engine, r in runs["fill_mask"].items():
            ys = [median(_values(r, lambda x, s=s: _med(x["latency"][str(s)])) or [float("nan")]) for s in seqs]
            if _rounds(r):
                ax.plot(seqs, ys, marker="o", label=LABELS.get(engine, engine))
        ax.set(xlabel="sequence length (tokens)", ylabel="latency, ms (batch 1, tokenization incl.)",
               title="fill-mask BERT-base: latency vs sequence length")
        ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "fill_mask_latency.png", dpi=110), plt.close(fig)
        written.append("fill_mask_latency.png")
    batches = results["params"].get("gen_batches", [])
    if runs.get("generation") and batches:
        fig, ax = plt.subplots(figsize=(6, 4))
        for engine, r in runs["generation"].items():
            if _rounds(r):
                ys = [median(_values(r, lambda x, b=b: x["tokens_per_s"][str(b)]["tokens_per_s"]) or [float("nan")])
                      for b in batches]
                ax.plot(batches, ys, marker="o", label=LABELS.get(engine, engine))
        ax.set(xlabel="batch size", ylabel="generated tokens/s (greedy)", title="GPT-2 small: tokens/s vs batch")
        ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "generation_tokens_per_s.png", dpi=110), plt.close(fig)
        written.append("generation_tokens_per_s.png")
    return written


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, out)
    (out / "latest.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "latest.md").write_text(markdown(results), encoding="utf-8")
