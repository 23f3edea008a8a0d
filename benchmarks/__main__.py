"""`python -m benchmarks [--quick] [--only AREA,...] [--with-optimum] [--tiny]`: see __init__."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .common import ROOT, available_gib, machine, run_worker
from .configs import REAL, TINY, Shape

AREAS = ["fill_mask", "generation", "gpt1b", "coldstart", "size"]
GIB_FOR_1B = 15.0  # export + fp32 parity holds the torch model and an fp32 session at once


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
        self.results: dict[str, Any] = {"runs": {}, "sizes": {}}

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
        if not (out / "jaonnx.json").is_file():
            self.log(f"exporting {shape.key} {precision}")
            args = {"src": str(self.source(shape)), "out": str(out)}
            if precision == "int8":
                args["quantize"] = "int8"
            elif precision == "fp16":
                args["dtype"] = "fp16"
            r = run_worker("export", args, self.threads, timeout=1500)
            if "error" in r:
                self.notes.append(f"{shape.key} {precision} export failed: {r['error']}")
                return None
            self.log(f"  {r['seconds']:.0f} s, peak RSS {r.get('peak_rss_mib', 0):.0f} MiB")
        import json

        manifest = json.loads((out / "jaonnx.json").read_text())
        if manifest.get("quality"):
            self.quality[f"{shape.key} {precision}"] = manifest["quality"]
        return out

    # ---- areas ---------------------------------------------------------------------------
    def engines(self, shape: Shape, int8: bool = True) -> dict[str, str | None]:
        found: dict[str, str | None] = {"torch": str(self.source(shape))}
        if self.args.with_optimum:
            found["optimum"] = str(self.source(shape)) if self.optimum_python() else None
        found["jaonnx-fp32"] = _s(self.artifact(shape, "fp32"))
        if int8:
            found["jaonnx-int8"] = _s(self.artifact(shape, "int8"))
        return found

    def run_engines(self, area: str, kind: str, engines: dict[str, str | None], args: dict[str, Any]) -> None:
        out = self.results["runs"].setdefault(area, {})
        for engine, path in engines.items():
            if path is None:
                continue
            self.log(f"{area}: {engine}")
            worker_engine = "jaonnx" if engine.startswith("jaonnx") else engine
            python = self.optimum_python() if engine == "optimum" else None
            out[engine] = run_worker(kind, {**args, "engine": worker_engine, "path": path, "threads": self.threads},
                                     self.threads, python=python)
            if "error" in out[engine]:
                self.notes.append(f"{area} {engine}: {out[engine]['error']}")

    def fill_mask(self) -> None:
        shape = self.shapes["bert-base"]
        by_seq, sentences, _ = _texts(self.twins(shape.recipe), shape.recipe, self.params["seqs"])
        self.run_engines("fill_mask", "fill_mask", self.engines(shape), {
            "texts_by_seq": by_seq, "sentences": sentences, "batches": self.params["fm_batches"],
            "repeat": self.params["repeat"]})

    def generation(self) -> None:
        shape = self.shapes["gpt2-small"]
        engines = self.engines(shape)
        engines.pop("optimum", None)  # Optimum's decoder export differs in inputs; fill-mask only
        _, _, lines = _texts(self.twins(shape.recipe), shape.recipe, [])
        self.run_engines("generation", "generation", engines, {
            "prefill": self.params["prefill"], "decode": self.params["decode"], "steps": self.params["steps"],
            "batches": self.params["gen_batches"], "prompts": lines[:8], "new_tokens": self.params["new_tokens"],
            "ttft_prompt": "".join(lines[8:11]), "repeat": max(3, self.params["repeat"] // 2)})

    def gpt1b(self) -> None:
        shape = self.shapes["gpt-1b"]
        free = available_gib()
        if not self.args.tiny and free < GIB_FOR_1B and not (self.work / "artifacts" / "gpt-1b-int8" / "jaonnx.json").is_file():
            self.notes.append(f"japanese-gpt-1b shape skipped: {free:.1f} GiB available, export needs ~{GIB_FOR_1B:.0f}")
            return
        engines = {"torch": str(self.source(shape)), "jaonnx-int8": _s(self.artifact(shape, "int8"))}
        self.run_engines("gpt1b", "decode", engines, {"decode": self.params["decode_1b"], "steps": self.params["steps_1b"]})

    def coldstart(self) -> None:
        bert, gpt = self.shapes["bert-base"], self.shapes["gpt2-small"]
        by_seq, _, lines = _texts(self.twins(bert.recipe), bert.recipe, [32])
        fm = {k: v for k, v in self.engines(bert).items() if k != "optimum"}
        gen = {k: v for k, v in self.engines(gpt).items() if k != "optimum"}
        for _ in range(self.params["cold_repeat"]):
            self.run_engines("coldstart_fill_mask", "coldstart", fm, {"task": "fill-mask", "text": by_seq["32"]})
            self.run_engines("coldstart_generation", "coldstart", gen, {"task": "text-generation", "text": lines[0]})

    def size(self) -> None:
        keys = ["bert-base", "gpt2-small"] + (["gpt-1b"] if (self.work / "artifacts" / "gpt-1b-int8").is_dir() else [])
        for key in keys:
            shape = self.shapes[key]
            sizes: dict[str, float | None] = {"torch": _size(self.source(shape), "model.safetensors")}
            for precision in ("fp32", "int8") + (("fp16",) if not self.args.quick and key != "gpt-1b" else ()):
                path = self.work / "artifacts" / f"{shape.key}-{precision}"
                if not path.is_dir() and key != "gpt-1b":
                    path = self.artifact(shape, precision)
                sizes[f"jaonnx-{precision}"] = _size(path, "model.onnx", "model.onnx.data") if path and path.is_dir() else None
            self.results["sizes"][key] = sizes

    # ---- Optimum (its own venv: it pins transformers < 4.58) ------------------------------
    def optimum_python(self) -> str | None:
        venv = self.work.parent / "optimum-venv"
        python = venv / "bin" / "python"
        if getattr(self, "_optimum", None) is not None:
            return self._optimum or None
        ok = python.is_file()
        if not ok:
            self.log("creating the Optimum venv (optimum-onnx, transformers 4.57)")
            try:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
                subprocess.run([str(python), "-m", "pip", "install", "-q", "optimum-onnx[onnxruntime]",
                                "transformers<4.58", "torch", "sentencepiece", "numpy", "-e", str(ROOT.parent)],
                               check=True, timeout=900, capture_output=True)
                ok = True
            except (subprocess.SubprocessError, OSError) as exc:
                self.notes.append(f"Optimum column skipped: could not create its venv ({exc.__class__.__name__})")
        self._optimum = str(python) if ok else ""
        return self._optimum or None

    def run(self) -> dict[str, Any]:
        q, tiny = self.args.quick, self.args.tiny
        self.params = {
            "threads": self.threads,
            "seqs": [16, 32, 64, 128],
            "fm_batches": [8, 32],
            "repeat": 5 if (q or tiny) else 15,
            "prefill": [32, 512] if not tiny else [32],
            "decode": [64, 512] if not tiny else [64],
            "steps": 8 if (q or tiny) else 24,
            "gen_batches": [1, 8],
            "new_tokens": 16 if (q or tiny) else 32,
            "decode_1b": [64],
            "steps_1b": 4 if (q or tiny) else 8,
            "cold_repeat": 1 if (q or tiny) else 2,
        }
        start = time.perf_counter()
        self.results |= {"mode": ("tiny smoke" if tiny else "quick" if q else "full"),
                         "started": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                         "params": self.params}
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
        return self.results


def _s(path: Path | None) -> str | None:
    return str(path) if path else None


def _size(directory: Path, *names: str) -> float:
    return sum((directory / n).stat().st_size for n in names if (directory / n).is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 1B shape (a few minutes)")
    parser.add_argument("--only", help=f"comma-separated areas: {','.join(AREAS)}")
    parser.add_argument("--with-optimum", action="store_true", help="add Optimum's ORTModel (own venv)")
    parser.add_argument("--tiny", action="store_true", help="twin-sized shapes: a smoke run of the suite")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("JAONNX_THREADS", 0)) or (os.cpu_count() or 1))
    parser.add_argument("--cache", default="~/.cache/jaonnx-benchmarks", help="checkpoints and artifacts, reused")
    parser.add_argument("--twins", help="an existing twins directory (tokenizers are taken from it)")
    parser.add_argument("--out", default=str(ROOT / "results"), help="where latest.md/json and plots go")
    args = parser.parse_args(argv)
    results = Suite(args).run()
    out = Path(args.out)
    report.write(results, out)
    sys.stdout.write(report.markdown(results))
    print(f"\nwrote {out / 'latest.md'}, {out / 'latest.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
