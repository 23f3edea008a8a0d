"""jaonnx against llama.cpp, side by side at batch 1 on the same random-weight checkpoint.

`python -m benchmarks.llamacpp [--shape gpt2-small] [--rounds 4] [--threads 2]` (after
`python -m benchmarks.peers llamacpp`, a source build of llama-cpp-python):
1. writes the checkpoint as an f32 GGUF (benchmarks/gguf_writer.py) and quantizes it with
   llama.cpp's quantizer to Q8_0, Q4_0 and Q4_K_M;
2. checks that llama.cpp's f32 greedy tokens equal transformers' on the same ids;
3. times each GGUF with flash attention off and on, and keeps the faster;
4. measures in interleaved rounds, one fresh process per (round, engine): decode ms/token at
   context 64 and 512, prefill of 128 tokens (time to the first token), peak RSS; then cold start
   (new process -> first token, warm page cache) and file size.
Both engines get token-exact prompts of the same length (jaonnx a text of exactly that many
tokens, llama.cpp its ids). Results: results/llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from jaonnx.bench import read_bandwidth_gbs, stats, weight_bytes

from . import peers
from .common import ROOT, machine, run_worker
from .configs import REAL, TINY, Shape

QUANTS = ("f32", "q8_0", "q4_0", "q4_k_m")
PRECISIONS = ("fp32", "int8", "int4")
LABELS = {"jaonnx-fp32": "jaonnx fp32", "jaonnx-int8": "jaonnx int8", "jaonnx-int4": "jaonnx int4",
          "llamacpp-f32": "llama.cpp f32", "llamacpp-q8_0": "llama.cpp Q8_0", "llamacpp-q4_0": "llama.cpp Q4_0",
          "llamacpp-q4_k_m": "llama.cpp Q4_K_M"}
ORDER = ("llamacpp-f32", "jaonnx-fp32", "llamacpp-q8_0", "jaonnx-int8", "llamacpp-q4_0", "llamacpp-q4_k_m",
         "jaonnx-int4")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(shape: Shape, work: Path, twins: Path, threads: int) -> tuple[Path, dict[str, Path]]:
    """The random checkpoint and its jaonnx artifacts (made once, reused)."""
    src = work / "src" / shape.key
    if not (src / "config.json").is_file():
        log(f"random {shape.key} checkpoint")
        r = run_worker("make_source", {"twin": str(twins / shape.recipe), "out": str(src),
                                       "architecture": shape.architecture, "config": shape.config}, threads)
        if "error" in r:
            raise RuntimeError(r["error"])
    artifacts = {}
    for precision in PRECISIONS:
        out = work / "artifacts" / f"{shape.key}-{precision}"
        if not (out / "jaonnx.json").is_file():
            log(f"exporting {shape.key} {precision}")
            args = {"src": str(src), "out": str(out)} | ({"quantize": precision} if precision != "fp32" else {})
            r = run_worker("export", args, threads, timeout=1800)
            if "error" in r:
                raise RuntimeError(r["error"])
        artifacts[f"jaonnx-{precision}"] = out
    return src, artifacts


def write_ggufs(src: Path, out: Path, python: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "f32.gguf"
    files = {q: (f32 if q == "f32" else out / f"f32-{q}.gguf") for q in QUANTS}
    if not all(f.is_file() for f in files.values()):
        log("writing the GGUF files")
        subprocess.run([python, "-m", "benchmarks.gguf_writer", str(src), str(f32), "--quantize",
                        ",".join(q for q in QUANTS if q != "f32")], check=True, cwd=ROOT.parent)
    return {f"llamacpp-{q}": f for q, f in files.items()}


def prompts(shape: Shape, twins: Path, lengths: list[int]) -> dict[str, tuple[list[int], str]]:
    """length -> (ids, text): a text of exactly that many tokens for jaonnx's tokenizer and its ids."""
    from jaonnx.bench.artifact import prefix_with_tokens
    from jaonnx.recipes import get_recipe
    from jaonnx.tokenization import RecipeTokenizer, load_backend

    r = get_recipe(shape.recipe)
    backend = load_backend(r.tokenizer_backend, twins / shape.recipe / r.tokenizer_file)
    special = {role: backend.piece_to_id(tok) for role, tok in r.special.items()}
    tok = RecipeTokenizer.from_file(r, twins / shape.recipe / r.tokenizer_file, special)
    out = {}
    for n in lengths:
        text = prefix_with_tokens(lambda t: len(tok.encode_text(t)), n)
        out[str(n)] = (list(map(int, tok.encode_text(text))), text)
    return out


def transformers_greedy(src: Path, ids: list[int], n: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def llamacpp_greedy(python: str, gguf: Path, ids: list[int], n: int, threads: int) -> list[int]:
    code = ("import json,sys; from benchmarks.gguf_writer import greedy; "
            f"print(json.dumps(greedy({str(gguf)!r}, {ids!r}, {n}, threads={threads})))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict[str, float]:
    s = stats(values)
    return {"median": s.median, "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-small", choices=["gpt2-small", "gpt-1b"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="twin-sized shape: a smoke run")
    parser.add_argument("--flash-attn", choices=["measure", "on", "off"], default="measure",
                        help="measure: time off and on per GGUF and keep the faster (default)")
    parser.add_argument("--no-first-load", action="store_true", help="skip jaonnx's first-load-ever cold start")
    parser.add_argument("--cache", default="~/.cache/jaonnx-benchmarks")
    parser.add_argument("--twins", required=True, help="a twins directory (tokenizers are taken from it)")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]  # recorded: a busy machine makes llama.cpp's figures meaningless

    shape = (TINY if args.tiny else REAL)[args.shape]
    work = Path(args.cache).expanduser() / ("tiny" if args.tiny else "real")
    twins = Path(args.twins).expanduser()
    python, why = peers.ensure("llamacpp", log=log)
    if python is None:
        raise SystemExit(f"llama.cpp peer unavailable: {why}")
    src, engines = prepare(shape, work, twins, args.threads)
    ggufs = write_ggufs(src, work / "gguf" / shape.key, python)
    engines |= ggufs
    texts = prompts(shape, twins, [64, 128, 512])
    contexts = {k: texts[k] for k in ("64", "512")}
    results: dict[str, Any] = {"shape": shape.key, "config": shape.config, "machine": machine(),
                               "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                               "started": dt.datetime.now().isoformat(timespec="seconds")}
    results["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs(threads=args.threads)

    log("checking llama.cpp's f32 greedy tokens against transformers'")
    ids = texts["64"][0]
    ours, theirs = llamacpp_greedy(python, ggufs["llamacpp-f32"], ids, 16, args.threads), transformers_greedy(src, ids, 16)
    results["f32_greedy_equal"] = ours == theirs
    results["f32_greedy"] = {"llamacpp": ours, "transformers": theirs}
    log(f"  equal: {ours == theirs}")

    base = {"contexts": contexts, "prefill": texts["128"], "steps": args.steps, "repeat": 3}
    flash = {engine: args.flash_attn == "on" for engine in ggufs}
    for engine in ggufs if args.flash_attn == "measure" else ():
        times = {}
        for fa in (False, True):
            r = run_worker("decode_rows", {**base, "repeat": 2, "engine": "llamacpp", "path": str(ggufs[engine]),
                                           "threads": args.threads, "flash_attn": fa}, args.threads, python=python)
            times[fa] = sum(r["decode"][c]["median"] for c in contexts) + r["prefill"]["median"] if "error" not in r \
                else float("inf")
        flash[engine] = times[True] < times[False]
        log(f"  {engine}: flash attention {'on' if flash[engine] else 'off'} ({times})")
    results["flash_attn"] = flash
    results["flash_attn_chosen_by"] = "measured (off and on, faster kept)" if args.flash_attn == "measure" \
        else f"--flash-attn {args.flash_attn}"

    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ORDER}
    cold: dict[str, list[float]] = {e: [] for e in ORDER}
    cold_first: dict[str, list[float]] = {e: [] for e in ORDER if e.startswith("jaonnx")}
    coldstart_args = {"task": "text-generation", "text": texts["64"][1], "ids": texts["64"][0]}
    for r in range(args.rounds):
        for engine in ORDER if r % 2 == 0 else ORDER[::-1]:
            is_llama = engine.startswith("llamacpp")
            wargs = {**base, "engine": "llamacpp" if is_llama else "jaonnx", "path": str(engines[engine]),
                     "threads": args.threads, "flash_attn": flash.get(engine, False)}
            log(f"round {r + 1}: {engine}")
            py = python if is_llama else None
            runs[engine].append(run_worker("decode_rows", wargs, args.threads, python=py))
            c = run_worker("coldstart", {**coldstart_args, **wargs}, args.threads, python=py)
            cold[engine].append(c.get("cold_start_s", float("nan")))
            if not is_llama and not args.no_first_load:  # the first load ever: an empty optimized-graph cache
                with tempfile.TemporaryDirectory() as empty:
                    os.environ["JAONNX_CACHE_DIR"] = empty
                    c = run_worker("coldstart", {**coldstart_args, **wargs}, args.threads)
                    del os.environ["JAONNX_CACHE_DIR"]
                cold_first[engine].append(c.get("cold_start_s", float("nan")))

    results["raw"] = {"runs": runs, "cold": cold, "cold_first": cold_first}
    rows: dict[str, Any] = {}
    bw = results["machine"]["read_bandwidth_gbs"]
    for engine in ORDER:
        ok = [x for x in runs[engine] if "error" not in x]
        if not ok:
            rows[engine] = {"error": runs[engine][0].get("error") if runs[engine] else "not run"}
            continue
        path = Path(engines[engine])
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("model.onnx*"))
        row = {f"decode_{c}": _summary([x["decode"][c]["median"] for x in ok]) for c in contexts}
        row["prefill_128"] = _summary([x["prefill"]["median"] for x in ok])
        row["peak_rss_mib"] = _summary([x["peak_rss_mib"] for x in ok])
        row["cold_start_s"] = _summary(cold[engine])
        if cold_first.get(engine):
            row["cold_start_first_ever_s"] = _summary(cold_first[engine])
        if engine.startswith("jaonnx"):
            read = weight_bytes(path / "model.onnx")[0]
            row["floor_ms_ctx64"] = read / (bw * 1e9) * 1000
        row["file_bytes"] = size
        rows[engine] = row
    results["rows"] = rows
    results["load_average"] = load_at_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.shape == "gpt2-small" and not args.tiny else f"_{args.shape}" + ("_tiny" if args.tiny else "")
    (out / f"llamacpp{suffix}.json").write_text(json.dumps(results, indent=2))
    (out / f"llamacpp{suffix}.md").write_text(render(results))
    print(render(results))


def _cell(s: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not s:
        return "—"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = results["rows"]
    lines = [f"# jaonnx vs llama.cpp, {results['shape']} shape (random weights), batch 1",
             "",
             f"- CPU: {m['cpu']} ({', '.join(m['isa'])}), {m['logical_cores']} logical cores, threads used: "
             f"{results['threads']}; read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s; load average at the start "
             f"{results.get('load_average', float('nan')):.2f} (llama.cpp's busy-wait thread barriers collapse when "
             "another process holds a core: compare only runs on a quiet machine)",
             f"- {results['rounds']} interleaved rounds, one fresh process per (round, engine); each cell: median "
             "[min–max] over rounds; decode = (T(n+1 tokens) − T(1 token))/n, n = "
             f"{results['steps']}; prefill = time to the first token of a 128-token prompt",
             "- llama.cpp: llama-cpp-python built from source with GGML_NATIVE=ON; flash attention "
             f"({results.get('flash_attn_chosen_by', 'measured (off and on, faster kept)')}): "
             + ", ".join(f"{k.split('-', 1)[1]} {'on' if v else 'off'}" for k, v in results["flash_attn"].items()),
             f"- llama.cpp f32 greedy tokens equal transformers' (16 tokens after a 64-token prompt): "
             f"**{results['f32_greedy_equal']}**",
             f"- started {results['started']}",
             "",
             "| engine | decode ms/token, ctx 64 | decode ms/token, ctx 512 | prefill 128 (ms) | peak RSS (MiB) "
             "| cold start (s) | file (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for engine in ORDER:
        row = rows.get(engine, {})
        if "error" in row:
            lines.append(f"| {LABELS[engine]} | failed: {row['error'][:120]} | | | | | |")
            continue
        coldtext = _cell(row.get("cold_start_s"))
        if "cold_start_first_ever_s" in row:
            coldtext += f"; first load ever {_cell(row['cold_start_first_ever_s'])}"
        lines.append(f"| {LABELS[engine]} | {_cell(row.get('decode_64'))} | {_cell(row.get('decode_512'))} "
                     f"| {_cell(row.get('prefill_128'), '{:.0f}')} | {_cell(row.get('peak_rss_mib'), '{:.0f}')} "
                     f"| {coldtext} | {row.get('file_bytes', 0) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
