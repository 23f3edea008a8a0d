"""Structured output: what a constraint costs, and which library to use.

    python -m benchmarks.structured [--rounds 5] [--new 48] [--compare] [--skip-model]

1. Library choice (`--compare`): per-token mask time along sampled walks, and compile time of a
   10-field schema, for llguidance and, where installed, outlines-core and xgrammar, on
   synthetic sentencepiece vocabularies of 32,000 (GPT-2 small shape) and 44,928
   (japanese-gpt-1b) pieces with byte fallback.
2. The engine: added ms per token of `json_schema` against the same number of unconstrained
   tokens, at batch 1 and per row at batch 8, on the GPT-2 small shape (12 layers, 768 wide,
   random weights, the 32,000-piece vocabulary), interleaved A/B rounds, median.
3. The mask cost alone (jaonnx's `RowMatcher`: llguidance mask + unpacking + EOS rule) at
   vocab 32,000 and 44,928 (a tokenizer of that size, not the 1B model).

Writes benchmarks/results/structured.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CORPUS = ROOT.parent / "export" / "jaonnx_export" / "data" / "corpus_ja.txt"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3, as gpt2-small-ja; eos = 3

TEN_FIELDS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 16},
        "kana": {"type": "string", "pattern": "^[ァ-ン]{1,8}$"},
        "city": {"enum": ["東京", "大阪", "名古屋", "札幌", "福岡"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
        "address": {"type": "object", "properties": {"pref": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"}},
                    "required": ["pref", "zip"], "additionalProperties": False},
    },
    "required": ["id", "name", "kana", "city", "age", "score", "member", "tags", "date", "address"],
    "additionalProperties": False,
}
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 400}}, "required": ["text"],
             "additionalProperties": False}  # never finishes early: both arms run the same tokens


# ---- a sentencepiece vocabulary of a given size --------------------------------------------------
def synthetic_spm(size: int) -> bytes:
    """A unigram sentencepiece model with byte fallback and `size` pieces: the corpus's frequent
    character n-grams (with and without `▁`), ASCII words and digits, then kana/kanji pairs."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    text = CORPUS.read_text(encoding="utf-8")
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        for n in (1, 2, 3, 4, 5):
            counts.update(line[i : i + n] for i in range(len(line) - n + 1))
    ascii_pieces = [c for c in map(chr, range(33, 127))] + [str(i) for i in range(1000)] + [
        w for w in ("the", "of", "and", "to", "in", "is", "name", "city", "true", "false", "null", "id", "data",
                    "json", "type", "value", "text", "http", "www", "com", "ing", "tion", "er", "re", "on")]
    candidates = ascii_pieces + [p for p, _ in counts.most_common()]
    kana = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
    kanji = sorted({c for c in text if "\u4e00" <= c <= "\u9fff"})
    candidates += [a + b for a in kana + kanji for b in kana]
    proto = pb.ModelProto()
    kinds = {0: pb.ModelProto.SentencePiece.CONTROL, 1: pb.ModelProto.SentencePiece.UNKNOWN}
    for i, piece in enumerate(SPECIALS):
        proto.pieces.add(piece=piece, score=0.0, type=kinds.get(i, pb.ModelProto.SentencePiece.CONTROL))
    for b in range(256):
        proto.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    seen = set(SPECIALS)
    proto.pieces.add(piece="▁", score=-1.0, type=pb.ModelProto.SentencePiece.NORMAL)
    seen.add("▁")
    rank = 0
    for piece in candidates:
        for form in (piece, "▁" + piece):
            if len(proto.pieces) >= size:
                break
            if form in seen or not form.strip() or " " in form:
                continue
            seen.add(form)
            rank += 1
            proto.pieces.add(piece=form, score=-2.0 - np.log1p(rank), type=pb.ModelProto.SentencePiece.NORMAL)
    assert len(proto.pieces) == size, (len(proto.pieces), size)
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = size
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 2, 3, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    return proto.SerializeToString()


def vocabulary(spm_bytes: bytes, directory: Path) -> Any:
    from jaonnx.tokenization import SentencePieceBackend
    from jaonnx.tokenization.token_bytes import TokenVocabulary

    path = directory / f"spm-{len(spm_bytes)}.model"
    path.write_bytes(spm_bytes)
    backend = SentencePieceBackend(path)
    return backend, TokenVocabulary.from_backend(backend, [0, 1, 2, 3], 3)


# ---- 1. library choice ------------------------------------------------------------------------------
def walk_times(first: Any, allowed: Any, advance: Any, steps: int, seed: int = 0) -> list[float]:
    """Mask times (ms) along a random walk of allowed tokens; `allowed()` returns the ids."""
    rng = np.random.default_rng(seed)
    times = []
    state = first()
    for _ in range(steps):
        start = time.perf_counter()
        ids = allowed(state)
        times.append((time.perf_counter() - start) * 1e3)
        ids = [i for i in ids if i != 3]
        if not len(ids):
            break
        advance(state, int(rng.choice(ids)))
    return times


def llguidance_case(vocab: Any, backend: Any, schema: dict[str, Any], steps: int) -> dict[str, Any]:
    from jaonnx.generation.constraints import Constraints, constraint_spec

    spec = constraint_spec({"json_schema": schema})
    constraints = Constraints(lambda: vocab, backend.encode_exact)
    constraints.compile(constraint_spec({"regex": "a"}))  # the tokenizer itself is built once per model
    start = time.perf_counter()
    constraints.compile(spec)
    compile_ms = (time.perf_counter() - start) * 1e3
    times = walk_times(lambda: constraints.matcher(spec, 3), lambda m: np.flatnonzero(m.allowed(vocab.size)),
                       lambda m, t: m.advance(t), steps)
    return {"compile_ms": compile_ms, "mask_ms_median": statistics.median(times), "mask_ms_p90": float(np.percentile(times, 90)),
            "steps": len(times)}


def outlines_case(vocab: Any, schema: dict[str, Any], steps: int) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    mapping: dict[bytes, list[int]] = {}
    for i, t in enumerate(vocab.tokens[: vocab.size]):
        if i not in vocab.special_ids:
            mapping.setdefault(t, []).append(i)
    ov = Vocabulary(3, mapping)
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), ov)
    compile_ms = (time.perf_counter() - start) * 1e3
    times = walk_times(lambda: Guide(index), lambda g: g.get_tokens(), lambda g, t: g.advance(t), steps)
    return {"compile_ms": compile_ms, "mask_ms_median": statistics.median(times), "mask_ms_p90": float(np.percentile(times, 90)),
            "steps": len(times)}


def xgrammar_case(vocab: Any, schema: dict[str, Any], steps: int) -> dict[str, Any]:
    import xgrammar as xgr

    encoded = [b"" if i in vocab.special_ids else t for i, t in enumerate(vocab.tokens[: vocab.size])]
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.RAW, vocab_size=vocab.size, stop_token_ids=[3])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    compile_ms = (time.perf_counter() - start) * 1e3
    bitmask = xgr.allocate_token_bitmask(1, vocab.size)

    def allowed(m: Any) -> Any:
        m.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: vocab.size]
        return np.flatnonzero(bits)

    times = walk_times(lambda: xgr.GrammarMatcher(compiled), allowed, lambda m, t: m.accept_token(t), steps)
    return {"compile_ms": compile_ms, "mask_ms_median": statistics.median(times), "mask_ms_p90": float(np.percentile(times, 90)),
            "steps": len(times), "needs": "torch (a hard dependency of the package)"}


def compare(vocabs: dict[int, tuple[Any, Any]], steps: int) -> list[dict[str, Any]]:
    rows = []
    for size, (backend, vocab) in vocabs.items():
        cases = {"llguidance": lambda: llguidance_case(vocab, backend, TEN_FIELDS, steps),
                 "outlines-core": lambda: outlines_case(vocab, TEN_FIELDS, steps),
                 "xgrammar": lambda: xgrammar_case(vocab, TEN_FIELDS, steps)}
        for name, case in cases.items():
            try:
                row = case()
            except ImportError as exc:
                row = {"error": f"not installed ({exc.name})"}
            except Exception as exc:  # a library that cannot take the schema or the vocabulary
                row = {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"}
            rows.append({"library": name, "vocab": size, **row})
            print(rows[-1], flush=True)
    return rows


# ---- 2. the engine -----------------------------------------------------------------------------------
def gpt2_small_artifact(spm_bytes: bytes, directory: Path) -> Path:
    import torch
    import transformers
    from typer.testing import CliRunner

    from jaonnx.cli import app

    src, out = directory / "gpt2-small-src", directory / "gpt2-small"
    if (out / "jaonnx.json").is_file():
        return out
    src.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32000, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(src)
    (src / "spiece.model").write_bytes(spm_bytes)
    (src / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>",
         "eos_token": "</s>", "extra_ids": 0, "model_max_length": 1024}))
    result = CliRunner().invoke(app, ["export", str(src), "-o", str(out), "--recipe", "gpt2-small-ja"])
    assert result.exit_code == 0, result.output
    return out


class HookTimer:
    """Wall and thread-CPU time spent in the engine's structured-output hooks (the mask before
    sampling, the matcher's advance after): the constraint's own cost, free of the model's noise."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.thread_time() - c
        return timed


def engine_overhead(artifact: Path, rounds: int, new: int) -> list[dict[str, Any]]:
    """Per batch size: the hooks' time per generated token (instrumented), and the A/B wall-clock
    difference of whole runs (constrained vs the same number of unconstrained tokens)."""
    import jaonnx
    from jaonnx.generation import constraints as constraints_module
    from jaonnx.generation import engine as engine_module

    gen = jaonnx.load(artifact, providers="cpu")
    prompt = "人物のデータ:"
    base = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, num_return_sequences=1)
    timer = HookTimer()
    engine_module.constrain_logits = timer.wrap(constraints_module.constrain_logits)
    constraints_module.RowMatcher.advance = timer.wrap(constraints_module.RowMatcher.advance)
    rows = []
    for batch in (1, 8):
        def run(constrained: bool) -> float:
            engine = gen.engine(max_batch_size=batch)
            for i in range(batch):
                extra = {"json_schema": LONG_TEXT} if constrained else {}
                engine.add_request(prompt, f"r{i}", **{**base, "seed": i}, **extra)
            start = time.perf_counter()
            tokens = 0
            while engine.has_unfinished_requests():
                tokens += sum(len(o.new_token_ids) for o in engine.step())
            assert tokens == new * batch, tokens
            return time.perf_counter() - start

        run(True), run(False)  # warm up (compile cached, sessions warm)
        timer.wall = timer.cpu = 0.0
        plain, constrained = [], []
        for _ in range(rounds):
            plain.append(run(False))
            constrained.append(run(True))
        p, c = statistics.median(plain), statistics.median(constrained)
        tokens = new * batch * rounds
        rows.append({"batch": batch, "new_tokens_per_row": new, "rounds": rounds,
                     "hooks_ms_per_token_per_row": timer.wall / tokens * 1e3,
                     "hooks_cpu_ms_per_token_per_row": timer.cpu / tokens * 1e3,
                     "plain_ms_per_step": p / new * 1e3, "constrained_ms_per_step": c / new * 1e3,
                     "ab_added_ms_per_token_per_row": (c - p) / (new * batch) * 1e3})
        print(rows[-1], flush=True)
    return rows


def mask_cost(vocabs: dict[int, tuple[Any, Any]], steps: int) -> list[dict[str, Any]]:
    from jaonnx.generation.constraints import Constraints, constrain_logits, constraint_spec

    rows = []
    for size, (backend, vocab) in vocabs.items():
        constraints = Constraints(lambda v=vocab: v, backend.encode_exact)
        spec = constraint_spec({"json_schema": TEN_FIELDS})
        constraints.compile(spec)
        rng = np.random.default_rng(0)
        for batch in (1, 8):
            matchers = [constraints.matcher(spec, 3) for _ in range(batch)]
            times = []
            for _ in range(steps):
                logits = rng.standard_normal((batch, size), dtype=np.float32)
                start = time.perf_counter()
                masked, verdicts = constrain_logits(logits, matchers)
                times.append((time.perf_counter() - start) * 1e3 / batch)
                if any(verdicts):
                    break
                for row, m in enumerate(matchers):
                    m.advance(int(masked[row].argmax()))
            rows.append({"vocab": size, "batch": batch, "ms_per_row_median": statistics.median(times),
                         "ms_per_row_p90": float(np.percentile(times, 90)), "steps": len(times)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compare", action="store_true", help="also time outlines-core and xgrammar")
    parser.add_argument("--skip-model", action="store_true", help="only the tokenizer-level measurements")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "jaonnx-structured-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    spms = {size: synthetic_spm(size) for size in (32000, 44928)}
    vocabs = {size: vocabulary(spm, args.work) for size, spm in spms.items()}
    report: dict[str, Any] = {"libraries": compare(vocabs, args.steps) if args.compare else [],
                              "mask_cost": mask_cost(vocabs, args.steps)}
    if not args.skip_model:
        report["engine"] = engine_overhead(gpt2_small_artifact(spms[32000], args.work), args.rounds, args.new)
    from benchmarks.common import machine

    report["machine"] = machine()
    report["threads"] = os.environ.get("JAONNX_THREADS", "")
    report["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "structured.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Structured output (`benchmarks/structured.py`)", ""]
    if report["libraries"]:
        lines += ["## Library choice: 10-field schema, sampled walks", "",
                  "| library | vocab | compile ms | mask ms/token (median) | p90 | note |", "|---|---:|---:|---:|---:|---|"]
        for r in report["libraries"]:
            if "error" in r:
                lines.append(f"| {r['library']} | {r['vocab']} | | | | {r['error']} |")
            else:
                lines.append(f"| {r['library']} | {r['vocab']} | {r['compile_ms']:.1f} | {r['mask_ms_median']:.3f} | "
                             f"{r['mask_ms_p90']:.3f} | {r.get('needs', '')} |")
        lines.append("")
    lines += ["## jaonnx's mask step (mask + apply to the logits), 10-field schema", "",
              "| vocab | batch | ms/row (median) | p90 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['vocab']} | {r['batch']} | {r['ms_per_row_median']:.3f} | {r['ms_per_row_p90']:.3f} |"
              for r in report["mask_cost"]]
    if "engine" in report:
        lines += ["", "## Engine: GPT-2 small shape (vocab 32000), json_schema vs the same unconstrained tokens", "",
                  "| batch | hooks ms/token/row (wall) | hooks CPU ms/token/row | target | plain ms/step | "
                  "constrained ms/step | A/B added ms/token/row |", "|---:|---:|---:|---|---:|---:|---:|"]
        for r in report["engine"]:
            target = "≤ 1" if r["batch"] == 1 else "≤ 2"
            lines.append(f"| {r['batch']} | {r['hooks_ms_per_token_per_row']:.3f} | {r['hooks_cpu_ms_per_token_per_row']:.3f} | "
                         f"{target} | {r['plain_ms_per_step']:.1f} | {r['constrained_ms_per_step']:.1f} | "
                         f"{r['ab_added_ms_per_token_per_row']:.3f} |")
        lines.append(f"\nHooks: time inside the engine's structured-output hooks (mask before sampling, matcher "
                     f"advance after), per generated token. A/B: median of {report['engine'][0]['rounds']} interleaved "
                     "rounds of whole runs (wall clock; on a shared machine the model's own noise dominates it).")
    m = report.get("machine", {})
    lines += ["", f"Machine: {m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical cores; "
              f"JAONNX_THREADS={report.get('threads') or 'default'}; load average at the end "
              f"{report.get('load', '?')} (a shared machine: trust CPU times over wall times)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
