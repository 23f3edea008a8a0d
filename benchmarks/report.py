"""results dict -> latest.md (table with ratios vs PyTorch), latest.json, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ENGINES = ["torch", "optimum", "jaonnx-fp32", "jaonnx-int8"]
LABELS = {"torch": "PyTorch eager", "optimum": "Optimum ORTModel", "jaonnx-fp32": "jaonnx fp32", "jaonnx-int8": "jaonnx int8"}


def _cell(value: float | None, ref: float | None, unit: str, higher_is_better: bool) -> str:
    if value is None:
        return "—"
    text = f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"
    if ref and value and unit:
        ratio = value / ref if higher_is_better else ref / value
        text += f" ({ratio:.2f}×)"
    return text


def rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float | None], str, bool]]:
    """(label, engine -> value, unit, higher_is_better) for every measured row."""
    out: list[tuple[str, dict[str, float | None], str, bool]] = []
    runs = results.get("runs", {})

    def pick(area: str, getter: Any) -> dict[str, float | None]:
        found = {}
        for engine in ENGINES:
            r = runs.get(area, {}).get(engine)
            try:
                found[engine] = getter(r) if r and "error" not in r else None
            except (KeyError, TypeError):
                found[engine] = None
        return found

    fm = "fill_mask"
    for seq in results.get("params", {}).get("seqs", []):
        for q in ("p50", "p90"):
            out.append((f"fill-mask BERT-base, batch 1, seq {seq}, {q}",
                        pick(fm, lambda r: r["latency"][str(seq)][q]), "ms", False))
    for b in results.get("params", {}).get("fm_batches", []):
        out.append((f"fill-mask BERT-base throughput, batch {b}", pick(fm, lambda r: r["throughput"][str(b)]["texts_per_s"]),
                    "texts/s", True))
    g = "generation"
    for n in results.get("params", {}).get("prefill", []):
        out.append((f"GPT-2 small prefill {n} tokens, p50", pick(g, lambda r: r["prefill"][str(n)]["p50"]), "ms", False))
    for c in results.get("params", {}).get("decode", []):
        out.append((f"GPT-2 small decode per token, context {c}", pick(g, lambda r: r["decode"][str(c)]["p50"]), "ms", False))
    for b in results.get("params", {}).get("gen_batches", []):
        out.append((f"GPT-2 small greedy tokens/s, batch {b}", pick(g, lambda r: r["tokens_per_s"][str(b)]["tokens_per_s"]),
                    "tok/s", True))
    out.append(("GPT-2 small time to first token (32-token prompt)", pick(g, lambda r: r["ttft"]["p50"]), "ms", False))
    for area, label in (("fill_mask", "fill-mask BERT-base"), ("generation", "GPT-2 small")):
        out.append((f"{label} peak RSS during the benchmark", pick(area, lambda r: r["peak_rss_mib"]), "MiB", False))
    for c in results.get("params", {}).get("decode_1b", []):
        out.append((f"japanese-gpt-1b shape decode per token, context {c}", pick("gpt1b", lambda r: r["decode"][str(c)]["p50"]),
                    "ms", False))
    out.append(("japanese-gpt-1b shape peak RSS (load + decode)", pick("gpt1b", lambda r: r["peak_rss_mib"]), "MiB", False))
    for area, label in (("coldstart_fill_mask", "fill-mask BERT-base"), ("coldstart_generation", "GPT-2 small")):
        out.append((f"cold start {label} (new process → first result)", pick(area, lambda r: r["cold_start_s"]), "s", False))
        out.append((f"cold start {label} peak RSS", pick(area, lambda r: r["peak_rss_mib"]), "MiB", False))
    for model, sizes in results.get("sizes", {}).items():
        out.append((f"artifact size {model} (PyTorch column: safetensors; fp16 → {_mb(sizes.get('jaonnx-fp16'))})",
                    {e: sizes.get(e) for e in ENGINES}, "MB", False))
    return [r for r in out if any(v is not None for v in r[1].values())]


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} MB"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    engines = [e for e in ENGINES if e != "optimum" or results.get("runs", {}).get("fill_mask", {}).get("optimum")]
    lines = [
        f"# jaonnx benchmarks ({results['mode']})", "",
        f"- CPU: {m['cpu']} ({', '.join(m['isa'])}), {m['logical_cores']} logical cores, {m['memory_mib']} MiB; "
        f"threads used: {results['params']['threads']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; Python {m['python']}",
        "- random weights at the real shapes (tiny shapes in smoke mode); ratios in parentheses are speed-ups "
        "(or size/RSS reductions) against PyTorch eager measured in this run",
        f"- started {results['started']}, took {results.get('seconds', 0):.0f} s", "",
        "| measurement | " + " | ".join(LABELS[e] for e in engines) + " |",
        "|---|" + "---|" * len(engines),
    ]
    for label, values, unit, higher in rows(results):
        ref = values.get("torch")
        lines.append(f"| {label} | " + " | ".join(_cell(values.get(e), ref, unit, higher) for e in engines) + " |")
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
            if r and "error" not in r:
                ax.plot(seqs, [r["latency"][str(s)]["p50"] for s in seqs], marker="o", label=LABELS.get(engine, engine))
        ax.set(xlabel="sequence length (tokens)", ylabel="p50 latency, ms (batch 1, tokenization incl.)",
               title="fill-mask BERT-base: latency vs sequence length")
        ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "fill_mask_latency.png", dpi=110), plt.close(fig)
        written.append("fill_mask_latency.png")
    batches = results["params"].get("gen_batches", [])
    if runs.get("generation") and batches:
        fig, ax = plt.subplots(figsize=(6, 4))
        for engine, r in runs["generation"].items():
            if r and "error" not in r:
                ax.plot(batches, [r["tokens_per_s"][str(b)]["tokens_per_s"] for b in batches], marker="o",
                        label=LABELS.get(engine, engine))
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
