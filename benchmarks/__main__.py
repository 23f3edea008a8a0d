"""`python -m benchmarks [--quick] [--only AREA,...] [--no-peers] [--tiny]`: see __init__."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jaonnx.bench import Calibrator, read_bandwidth_gbs, weight_bytes

from . import peers, report
from .common import ROOT, available_gib, machine, run_worker
from .configs import REAL, TINY, Shape

AREAS = ["fill_mask", "generation", "gpt1b", "coldstart", "size"]
# Peer columns: (peer venv, int8?) per area; CTranslate2 and onnxruntime-genai have no fill-mask.
PEER_COLUMNS = {
    "fill_mask": {"optimum": ("optimum", False), "openvino-fp32": ("openvino", False),
                  "openvino-int8": ("openvino", True)},
    "generation": {"optimum": ("optimum", False), "openvino-fp32": ("openvino", False),
                   "openvino-int8": ("openvino", True), "ctranslate2-fp32": ("ctranslate2", False),
                   "ctranslate2-int8": ("ctranslate2", True), "genai-fp32": ("genai", False),
                   "genai-int8": ("genai", True)},
}
GIB_FOR_1B = 9.0  # export peaks at ~1.5x the fp32 weights (7.8 GB measured for int8): the model is freed before ORT


def _texts(recipe_dir: Path, recipe: str, seqs: list[int]) -> tuple[dict[str, str], list[str], list[str]]:
    """Texts that tokenize to about `seq` tokens with one [MASK]; plain sentences and prompts."""
    from jaonnx.recipes import get_recipe
    from jaonnx.tokenization import RecipeTokenizer
    from jaonnx_export.twins import heldout_lines

    lines = heldout_lines()
    r = get_recipe(recipe)
    tok = RecipeTokenizer.from_file(r, recipe_dir / r.tokenizer_file, _special(recipe_dir, r))
    mask = r.special.mask or "[MASK]"
    by_seq = {}
    long = "".join(lines * 8)
    for seq in seqs:
        lo, hi = 1, len(long)
        while lo < hi:  # longest prefix whose masked encoding has <= seq tokens
            mid = (lo + hi + 1) // 2
            if len(tok.encode_masked(mask + long[:mid])) <= seq:
                lo = mid
            else:
                hi = mid - 1
        by_seq[str(seq)] = mask + long[:lo]
    sentences = [line[: len(line) // 2] + mask + line[len(line) // 2 + 1 :] for line in lines[:32]]
    return by_seq, sentences, lines


def _special(directory: Path, recipe: Any) -> dict[str, int]:
    from jaonnx.tokenization import load_backend

    backend = load_backend(recipe.tokenizer_backend, directory / recipe.tokenizer_file)
    return {role: backend.piece_to_id(tok) for role, tok in recipe.special.items()}


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shapes = TINY if args.tiny else REAL
        self.work = Path(args.cache).expanduser() / ("tiny" if args.tiny else "real")
        self.threads = args.threads
        self.notes: list[str] = []
        self.quality: dict[str, Any] = {}
        self.results: dict[str, Any] = {"runs": {}, "sizes": {}, "unavailable": {}, "weight_bytes": {},
                                        "discarded": []}
        self.failed_exports: set[tuple[str, str]] = set()
        self.calibrator = Calibrator(tolerance=args.slow_tolerance or float("inf"))

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ---- preparation (cached across runs) ----------------------------------------------------
    def twins(self, recipe: str) -> Path:
        root = Path(self.args.twins).expanduser() if self.args.twins else self.work.parent / "twins"
        if not (root / recipe / "config.json").is_file():
            from jaonnx_export.twins import build_twins

            self.log(f"building the {recipe} twin (for its tokenizer)")
            build_twins(root, [recipe])
        return root / recipe

    def source(self, shape: Shape) -> Path:
        out = self.work / "src" / shape.key
        if not (out / "config.json").is_file():
            self.log(f"random {shape.key} checkpoint")
            r = run_worker("make_source", {"twin": str(self.twins(shape.recipe)), "out": str(out),
                                           "architecture": shape.architecture, "config": shape.config}, self.threads)
            if "error" in r:
                raise RuntimeError(r["error"])
        return out

    def artifact(self, shape: Shape, precision: str) -> Path | None:
        out = self.work / "artifacts" / f"{shape.key}-{precision}"
        if (shape.key, precision) in self.failed_exports:
            return None
        if not (out / "jaonnx.json").is_file():
            self.log(f"exporting {shape.key} {precision}")
            args = {"src": str(self.source(shape)), "out": str(out)}
            if precision in ("int8", "int4"):
                args["quantize"] = precision
            elif precision == "fp16":
                args["dtype"] = "fp16"
            r = run_worker("export", args, self.threads, timeout=1500)
            if "error" in r:
                self.notes.append(f"{shape.key} {precision} export failed: {r['error']}")
                self.results["unavailable"][f"jaonnx-{precision}"] = f"export failed: {r['error']}"
                self.failed_exports.add((shape.key, precision))
                return None
            self.log(f"  {r['seconds']:.0f} s, peak RSS {r.get('peak_rss_mib', 0):.0f} MiB")
        import json

        manifest = json.loads((out / "jaonnx.json").read_text())
        if manifest.get("quality"):
            self.quality[f"{shape.key} {precision}"] = manifest["quality"]
        self.results["weight_bytes"].setdefault(shape.key, {})[precision] = weight_bytes(out / manifest["model_file"])[0]
        return out

    # ---- areas ---------------------------------------------------------------------------
    def engines(self, shape: Shape, area: str, int8: bool = True) -> dict[str, str | None]:
        found: dict[str, str | None] = {"torch": str(self.source(shape))}
        found["jaonnx-fp32"] = _s(self.artifact(shape, "fp32"))
        if int8:
            found["jaonnx-int8"] = _s(self.artifact(shape, "int8"))
            found["jaonnx-int4"] = _s(self.artifact(shape, "int4"))
        if not self.args.no_peers:
            for column, (peer, _) in PEER_COLUMNS.get(area, {}).items():
                found[column] = self.peer_path(shape, column, peer)
        return found

    def peer_path(self, shape: Shape, column: str, peer: str) -> str | None:
        """The peer's input (checkpoint, or for genai a jaonnx artifact with genai_config.json)."""
        python, why = peers.ensure(peer, log=self.log)
        if python is None:
            self.results["unavailable"][column] = why
            return None
        if peer != "genai":
            return str(self.source(shape))
        artifact = self.artifact(shape, "int8" if column.endswith("int8") else "fp32")
        if artifact is None:
            self.results["unavailable"][column] = "no jaonnx artifact to run"
            return None
        if (artifact / "genai_config.json").is_file():
            return str(artifact)
        from .genai_copy import make_copy

        note = ("onnxruntime-genai runs a copy of jaonnx's graph with logits_to_keep frozen and a "
                "genai_config.json written by benchmarks/genai_copy.py (artifacts do not carry one yet)")
        if note not in self.notes:
            self.notes.append(note)
        try:
            return str(make_copy(artifact, self.work / "peers" / f"{column}-{shape.key}"))
        except Exception as exc:  # recorded in the table, not hidden
            self.results["unavailable"][column] = f"could not prepare its copy: {exc.__class__.__name__}: {exc}"
            return None

    def run_engines(self, area: str, kind: str, engines: dict[str, str | None], args: dict[str, Any],
                    rounds: int | None = None) -> None:
        """`rounds` interleaved rounds over the engines; each (round, engine) is one fresh worker
        process, preceded and followed by a machine-speed probe: a run in a slow window is
        discarded and measured again."""
        out = self.results["runs"].setdefault(area, {})
        for r in range(rounds or self.params["rounds"]):
            for engine, path in engines.items():
                if path is None or any("error" in x for x in out.get(engine, [])):
                    continue
                self.log(f"{area}: {engine} (round {r + 1})")
                out.setdefault(engine, []).append(self.measure(area, kind, engine, path, args))

    def measure(self, area: str, kind: str, engine: str, path: str, args: dict[str, Any]) -> dict[str, Any]:
        column = PEER_COLUMNS.get(area, PEER_COLUMNS["generation"]).get(engine)
        worker_engine = "jaonnx" if engine.startswith("jaonnx") else column[0] if column else engine
        python = str(peers.python_of(column[0])) if column else None
        extra = {"int8": bool(column and column[1]),
                 "peer_cache": str(self.work / "peers" / f"{engine}-{area}")} if column else {}
        for attempt in range(self.args.slow_retries + 1):
            for _ in range(5):  # wait (briefly) for a normal window before starting
                if self.calibrator.ok():
                    break
                time.sleep(2)
            before = self.calibrator.history[-1]
            result = run_worker(kind, {**args, **extra, "engine": worker_engine, "path": path, "threads": self.threads},
                                self.threads, python=python)
            slow = max(before, self.calibrator.measure()) / self.calibrator.best
            result["machine_slowdown"] = slow
            if "error" in result:
                self.notes.append(f"{area} {engine}: {result['error']}")
                return result
            if self.calibrator.ok(slow * self.calibrator.best) or attempt == self.args.slow_retries:
                if slow > self.calibrator.tolerance:
                    result["slow_window"] = True
                    self.notes.append(f"{area} {engine}: still in a slow window ({slow:.2f}×) after "
                                      f"{attempt + 1} tries; kept and flagged")
                return result
            self.results["discarded"].append({"area": area, "engine": engine, "slowdown": slow})
            self.log(f"  slow window ({slow:.2f}× the fastest probe): discarded, measuring again")
        return result

    def fill_mask(self) -> None:
        shape = self.shapes["bert-base"]
        by_seq, sentences, _ = _texts(self.twins(shape.recipe), shape.recipe, self.params["seqs"])
        self.run_engines("fill_mask", "fill_mask", self.engines(shape, "fill_mask"), {
            "texts_by_seq": by_seq, "sentences": sentences, "batches": self.params["fm_batches"],
            "repeat": self.params["repeat"]})

    def prompts(self, shape: Shape, contexts: list[int]) -> dict[str, tuple[list[int], str]]:
        """context -> (ids, text): a text of exactly that many tokens (jaonnx's tokenizer) and its ids."""
        from jaonnx.bench.artifact import prefix_with_tokens
        from jaonnx.recipes import get_recipe
        from jaonnx.tokenization import RecipeTokenizer

        twin = self.twins(shape.recipe)
        r = get_recipe(shape.recipe)
        tok = RecipeTokenizer.from_file(r, twin / r.tokenizer_file, _special(twin, r))
        out = {}
        for c in contexts:
            text = prefix_with_tokens(lambda t: len(tok.encode_text(t)), c)
            out[str(c)] = (tok.encode_text(text), text)
        return out

    def generation(self) -> None:
        shape = self.shapes["gpt2-small"]
        engines = self.engines(shape, "generation")
        _, _, lines = _texts(self.twins(shape.recipe), shape.recipe, [])
        grounded = "".join(lines[:6])
        self.run_engines("generation", "generation", engines, {
            "contexts": self.prompts(shape, self.params["decode"]), "steps": self.params["steps"],
            "batches": self.params["gen_batches"], "new_tokens": self.params["new_tokens"],
            "repeat": self.params["inner_repeat"],
            # input-grounded: the prompt repeated, so a continuation can copy spans of it
            "lookup_prompt": grounded + grounded[: len(grounded) // 2], "lookup_n": 10})

    def gpt1b(self) -> None:
        shape = self.shapes["gpt-1b"]
        free = available_gib()
        if not self.args.tiny and free < GIB_FOR_1B and not (self.work / "artifacts" / "gpt-1b-int8" / "jaonnx.json").is_file():
            self.notes.append(f"japanese-gpt-1b shape skipped: {free:.1f} GiB available, export needs ~{GIB_FOR_1B:.0f}")
            return
        engines = {"torch": str(self.source(shape)), "jaonnx-int8": _s(self.artifact(shape, "int8")),
                   "jaonnx-int4": _s(self.artifact(shape, "int4"))}
        self.run_engines("gpt1b", "decode", engines, {"contexts": self.prompts(shape, self.params["decode_1b"]),
                                                      "steps": self.params["steps_1b"], "repeat": 3})

    def coldstart(self) -> None:
        bert, gpt = self.shapes["bert-base"], self.shapes["gpt2-small"]
        by_seq, _, lines = _texts(self.twins(bert.recipe), bert.recipe, [32])
        fm = {k: v for k, v in self.engines(bert, "coldstart").items()}
        gen = {k: v for k, v in self.engines(gpt, "coldstart").items()}
        self.run_engines("coldstart_fill_mask", "coldstart", fm, {"task": "fill-mask", "text": by_seq["32"]})
        self.run_engines("coldstart_generation", "coldstart", gen, {"task": "text-generation", "text": lines[0]})

    def size(self) -> None:
        keys = ["bert-base", "gpt2-small"] + (["gpt-1b"] if (self.work / "artifacts" / "gpt-1b-int8").is_dir() else [])
        for key in keys:
            shape = self.shapes[key]
            sizes: dict[str, float | None] = {"torch": _size(self.source(shape), "model.safetensors")}
            for precision in ("fp32", "int8", "int4") + (("fp16",) if not self.args.quick and key != "gpt-1b" else ()):
                path = self.work / "artifacts" / f"{shape.key}-{precision}"
                if not (path / "jaonnx.json").is_file() and key != "gpt-1b" and precision != "int4":
                    path = self.artifact(shape, precision)
                ok = path and (path / "jaonnx.json").is_file()
                sizes[f"jaonnx-{precision}"] = _size(path, "model.onnx", "model.onnx.data") if ok else None
            self.results["sizes"][key] = sizes

    def run(self) -> dict[str, Any]:
        q, tiny = self.args.quick, self.args.tiny
        self.params = {
            "threads": self.threads,
            "seqs": [16, 32, 64, 128] if tiny else [32, 128],  # the targets' lengths; tiny ones cost nothing
            "fm_batches": [8, 32],
            "rounds": self.args.rounds,
            "repeat": 3 if (q or tiny) else 7,
            "inner_repeat": 3,
            "decode": [64, 512] if not tiny else [64],
            "steps": 8 if (q or tiny) else 16,
            "gen_batches": [1, 8],
            "new_tokens": 8 if (q or tiny) else 16,
            "decode_1b": [64],
            "steps_1b": 4 if (q or tiny) else 8,
        }
        start = time.perf_counter()
        self.results |= {"mode": ("tiny smoke" if tiny else "quick" if q else "full"),
                         "started": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                         "params": self.params}
        self.log("measuring memory read bandwidth and the machine-speed reference")
        self.results["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs(threads=self.threads)
        self.calibrator.measure()
        only = self.args.only.split(",") if self.args.only else AREAS
        if q and not self.args.only:
            only = [a for a in only if a != "gpt1b"]
            self.notes.append("--quick: the japanese-gpt-1b shape is left out (run `--only gpt1b` alone)")
        for area in only:
            if area not in AREAS:
                raise SystemExit(f"unknown area {area!r}: choose from {', '.join(AREAS)}")
        for area in AREAS:
            if area in only:
                getattr(self, area)()
        self.results["seconds"] = time.perf_counter() - start
        self.results["notes"] = self.notes
        self.results["quality"] = self.quality
        self.results["calibration"] = self.calibrator.to_dict()
        self.results["kv_bytes_per_context_token"] = {  # fp32 keys + values, all layers, batch 1
            k: 2 * 4 * s.config.get("n_layer", 0) * s.config.get("n_embd", 0) for k, s in self.shapes.items()}
        return self.results


def _s(path: Path | None) -> str | None:
    return str(path) if path else None


def _size(directory: Path, *names: str) -> float:
    return sum((directory / n).stat().st_size for n in names if (directory / n).is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 1B shape (a few minutes)")
    parser.add_argument("--only", help=f"comma-separated areas: {','.join(AREAS)}")
    parser.add_argument("--no-peers", action="store_true", help="leave out the peer engines (their venvs)")
    parser.add_argument("--with-optimum", action="store_true", help="(kept for old command lines; peers are on by default)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per engine; numbers are their median")
    parser.add_argument("--slow-tolerance", type=float, default=1.15,
                        help="discard a run when the speed probe is this much slower than the fastest (0: never)")
    parser.add_argument("--slow-retries", type=int, default=2, help="re-measurements of a run made in a slow window")
    parser.add_argument("--tiny", action="store_true", help="twin-sized shapes: a smoke run of the suite")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("JAONNX_THREADS", 0)) or (os.cpu_count() or 1))
    parser.add_argument("--cache", default="~/.cache/jaonnx-benchmarks", help="checkpoints and artifacts, reused")
    parser.add_argument("--twins", help="an existing twins directory (tokenizers are taken from it)")
    parser.add_argument("--out", default=str(ROOT / "results"), help="where latest.md/json and plots go")
    parser.add_argument("--venvs", help="directory holding the peer venvs .venv-<peer>/ (default: benchmarks/)")
    args = parser.parse_args(argv)
    if args.venvs:
        peers.VENVS = Path(args.venvs).expanduser().resolve()
    results = Suite(args).run()
    out = Path(args.out)
    report.write(results, out)
    sys.stdout.write(report.markdown(results))
    print(f"\nwrote {out / 'latest.md'}, {out / 'latest.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
