"""The GPU check of issue 19, in one process: every figure the issue asks for, or why not.

    PYTHONPATH=runtime:export python benchmarks/gpu_check.py --providers cuda --out gpu_check.json
    PYTHONPATH=runtime:export python benchmarks/gpu_check.py --providers cpu --shape tiny --quick  # dry run

Run it through benchmarks/gpu_check.sh on a GPU machine (that script installs onnxruntime-gpu).
Sections, each reported on its own (a failing one records its error and the rest still run):

1. build: a japanese-gpt-1b-shape fp16 artifact (24 layers, 2048 hidden, 16 heads, vocab
   44928) from random weights with the exporter's own pieces (the fused static graph builder,
   the fp16 converter, a manifest and a sentencepiece tokenizer trained on the shipped corpus).
   The export's parity and quality gates run on the CPU test twins, not here (minutes at 1.3B).
2. greedy: the artifact's greedy tokens (fp16, on the device, captured and uncaptured) against
   transformers' GPT2LMHeadModel in fp32 with the same weights (numpy's forward pass when
   transformers is missing), and the prefill logits' largest difference relative to their scale.
3. capture: rows joining and leaving a batch, CUDA graph capture on and off: identical tokens.
4. decode: ms per decode step at batch 1, context 64 and 512, captured and not (interleaved
   rounds, median), and tokens/s at batch 8 and at batch 5 (which replays bucket 8: the cost
   of the bucket's padding rows).
5. bench: `jaonnx bench ART --providers cuda` (time to first token, tokens/s through generate).
6. serving: `jaonnx serve ART --providers cuda` with 1, 8 and 32 streaming clients: tokens/s,
   time to first token, per-token latency p50/p99 (needs fastapi, uvicorn and httpx).
7. cold start: a fresh process from start to its first generated token.

The issue's targets (batch 1 <= 1.2 ms/token at context 64 and 512, batch 8 >= 5,000 tokens/s)
are compared in `targets`; on `--providers cpu` the run only proves the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decoder_loops import greedy_rows, join_leave  # noqa: E402  (benchmarks/ is on the path now)

SHAPES = {
    "1b": dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=44928, n_positions=1024),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=3000, n_positions=1024),
}
RECIPE = "rinna-gpt-1b"
PROMPTS = ["近年の機械学習は", "東京は日本の", "今日は天気が良いので", "大学で"]
# Ids the artifact's sentencepiece model (trained with the twin's layout, ~2,280 pieces) can
# decode: the other rows of the embedding table are shrunk so they never win, since the runtime
# refuses to detokenize an id the tokenizer does not have.
USABLE_IDS = 2000
TARGETS = {"b1_ctx64_ms": 1.2, "b1_ctx512_ms": 1.2, "b8_tokens_per_s": 5000.0}


# ---- 1. the artifact -----------------------------------------------------------------------------


def random_weights(shape: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 weights with unit-variance activations (std 1/sqrt(fan-in)), a unit-variance tied
    embedding table (peaked logits: clear greedy winners) and block outputs scaled so that the
    blocks, not the current token's own embedding, dominate the residual stream (its std is
    about 20, whatever the depth). A small random init instead makes a tied GPT-2 repeat its
    last token forever, which would check nothing. The large residual also exercises fp16
    LayerNorm: its sum of squares overflows fp16 unless accumulated in fp32."""
    rng = np.random.default_rng(seed)
    n, v, p = shape["n_embd"], shape["vocab_size"], shape["n_positions"]

    def r(*dims: int, std: float) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * np.float32(std)).astype(np.float32)

    inv = 1.0 / np.sqrt(n)
    out = float(np.sqrt(200.0 / shape["n_layer"]))  # 2 * layers block outputs of variance out**2: 400
    wte = r(v, n, std=1.0)
    wte[USABLE_IDS:] *= np.float32(0.01)
    w = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(p, n, std=1.0),
         "transformer.ln_f.weight": np.ones(n, np.float32), "transformer.ln_f.bias": np.zeros(n, np.float32)}
    for i in range(shape["n_layer"]):
        h = f"transformer.h.{i}"
        w |= {f"{h}.ln_1.weight": np.ones(n, np.float32), f"{h}.ln_1.bias": r(n, std=0.02),
              f"{h}.ln_2.weight": np.ones(n, np.float32), f"{h}.ln_2.bias": r(n, std=0.02),
              f"{h}.attn.c_attn.weight": r(n, 3 * n, std=inv), f"{h}.attn.c_attn.bias": r(3 * n, std=0.02),
              f"{h}.attn.c_proj.weight": r(n, n, std=out * inv), f"{h}.attn.c_proj.bias": r(n, std=0.02),
              f"{h}.mlp.c_fc.weight": r(n, 4 * n, std=inv), f"{h}.mlp.c_fc.bias": r(4 * n, std=0.02),
              f"{h}.mlp.c_proj.weight": r(4 * n, n, std=out / np.sqrt(2 * n)), f"{h}.mlp.c_proj.bias": r(n, std=0.02)}
    return w


def gpt2_config(shape: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(**shape, layer_norm_epsilon=1e-5, activation_function="gelu_new", scale_attn_weights=True,
                           scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)


def duck_model(weights: dict[str, np.ndarray], shape: dict[str, int]) -> Any:
    """Just enough of a GPT2LMHeadModel (tied head) for `decoder_graph.build`, over numpy."""
    from gpu_decode import _Tensor

    state = {k: _Tensor(v) for k, v in weights.items()}
    wte = state["transformer.wte.weight"]
    return SimpleNamespace(config=gpt2_config(shape), state_dict=lambda: state, lm_head=SimpleNamespace(weight=wte),
                           transformer=SimpleNamespace(wte=SimpleNamespace(weight=wte)))


def tokenizer(directory: Path) -> dict[str, int]:
    """Train the rinna-gpt-1b twin's sentencepiece layout on the shipped corpus into
    `directory`/spiece.model; the special ids of the recipe."""
    import sentencepiece as spm

    from jaonnx.recipes import get_recipe
    from jaonnx_export.twins.build import TWINS, train_lines
    from jaonnx_export.twins.tokenizers import train_spm

    model = train_spm(train_lines(), TWINS[RECIPE].layout, TWINS[RECIPE].vocab_size)
    (directory / "spiece.model").write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    return {role: processor.piece_to_id(token) for role, token in get_recipe(RECIPE).special.items()}


def build_artifact(shape: dict[str, int], weights: dict[str, np.ndarray], out: Path) -> Path:
    from jaonnx.artifact import Manifest
    from jaonnx.recipes import get_recipe
    from jaonnx_export import decoder_graph
    from jaonnx_export.fp16 import convert_fp16
    from jaonnx_export.graph_info import io_dtypes

    if out.exists():
        shutil.rmtree(out)
    (out / "fp32").mkdir(parents=True)
    decoder_graph.build(duck_model(weights, shape), out / "fp32" / "model.onnx")
    convert_fp16(out / "fp32" / "model.onnx", out / "model.onnx", "model.onnx.data")
    shutil.rmtree(out / "fp32")
    special = tokenizer(out)
    inputs, outputs = io_dtypes(out / "model.onnx")
    manifest = Manifest(recipe=RECIPE, task="text-generation", model_file="model.onnx", tokenizer_file="spiece.model",
                        special_ids=special, vocab_size=shape["vocab_size"], max_positions=shape["n_positions"],
                        inputs=inputs, outputs=outputs, dtype="fp16", external_data="model.onnx.data",
                        decoder=decoder_graph.decoder_shape(gpt2_config(shape)), recipe_spec=get_recipe(RECIPE),
                        source="random weights (gpu_check)")
    manifest.write(out)
    return out


# ---- 2. references -----------------------------------------------------------------------------


def reference_greedy(weights: dict[str, np.ndarray], shape: dict[str, int], prompt: list[int],
                     new: int) -> tuple[str, list[int], np.ndarray]:
    """(which reference, greedy tokens, prefill logits): transformers' GPT2LMHeadModel in fp32
    with these weights (on the GPU when torch has one), else numpy's forward pass."""
    try:
        return ("transformers", *_transformers_greedy(weights, shape, prompt, new))
    except Exception as exc:  # no transformers, or one this code does not fit: numpy instead
        print(f"[gpu_check] transformers reference unavailable ({type(exc).__name__}: {exc}); using numpy", flush=True)
        return ("numpy", *_numpy_greedy(weights, shape, prompt, new))


def _transformers_greedy(weights: dict[str, np.ndarray], shape: dict[str, int], prompt: list[int],
                         new: int) -> tuple[list[int], np.ndarray]:
    import torch
    import transformers
    config = transformers.GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                                     vocab_size=shape["vocab_size"], n_positions=shape["n_positions"],
                                     activation_function="gelu_new", tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False, assign=True)
    model.tie_weights()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        logits = model(input_ids=ids).logits[0].float().cpu().numpy()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    del model
    return out[0, len(prompt):].tolist(), logits


def _numpy_greedy(weights: dict[str, np.ndarray], shape: dict[str, int], prompt: list[int], new: int) -> tuple[list[int], np.ndarray]:
    ids = list(prompt)
    first = None
    for _ in range(new):
        logits = numpy_forward(weights, shape, ids)
        first = logits if first is None else first
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], first


def numpy_forward(w: dict[str, np.ndarray], shape: dict[str, int], ids: list[int]) -> np.ndarray:
    """GPT-2's forward pass (gelu_new, tied head) in fp32 numpy: logits [len(ids), vocab]."""
    n, heads = shape["n_embd"], shape["n_head"]
    d = n // heads

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w[f"{p}.weight"] + w[f"{p}.bias"]

    t = len(ids)
    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:t]
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    for i in range(shape["n_layer"]):
        p = f"transformer.h.{i}"
        qkv = norm(x, f"{p}.ln_1") @ w[f"{p}.attn.c_attn.weight"] + w[f"{p}.attn.c_attn.bias"]
        q, k, v = (a.reshape(t, heads, d).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(t, n) @ w[f"{p}.attn.c_proj.weight"] + w[f"{p}.attn.c_proj.bias"]
        h = norm(x, f"{p}.ln_2") @ w[f"{p}.mlp.c_fc.weight"] + w[f"{p}.mlp.c_fc.bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + h @ w[f"{p}.mlp.c_proj.weight"] + w[f"{p}.mlp.c_proj.bias"]
    return norm(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


# ---- decoders on the device --------------------------------------------------------------------


_SESSIONS: dict[tuple[str, str, bool], Any] = {}


def decoder(artifact: Path, providers: str, capture: bool) -> Any:
    """A StaticBatchDecoder on `providers`; with `capture` on the CPU, the capture machinery
    runs on a fake device (the CPU execution provider) so the dry run exercises it too."""
    from jaonnx.artifact import read_manifest
    from jaonnx.generation.cuda_graphs import CudaGraphs
    from jaonnx.generation.static_cache import StaticBatchDecoder
    from jaonnx.session import create_session

    manifest = read_manifest(artifact)
    key = (str(artifact), providers, capture)
    if key not in _SESSIONS:  # one session per setting: loading 1.3B weights takes seconds
        _SESSIONS[key] = create_session(artifact / manifest.model_file, providers, cuda_graph=capture)
    session = _SESSIONS[key]
    if providers == "cpu":
        graphs: Any = CudaGraphs(session, "cpu", manifest.vocab_size) if capture else False
        return StaticBatchDecoder(session, manifest, cuda_graphs=graphs)
    dec = StaticBatchDecoder(session, manifest)
    if capture and dec.graphs is None:
        raise RuntimeError("the session has no CUDA graph capture (enable_cuda_graph refused?)")
    return dec


def step_ms(dec: Any, batch: int, context: int, steps: int, vocab: int) -> float:
    """Median wall ms of a decode step (one token per row) after a `context`-token prefill."""
    prompt = [5 + i % (vocab - 10) for i in range(context)]
    tokens = dec.add([prompt] * batch, reserve=context + steps + 8).argmax(-1)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        tokens = dec.step(tokens[:, None])[:, -1].argmax(-1)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- 6. serving --------------------------------------------------------------------------------


def stream_once(url: str, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    """One streamed completion: time to first chunk, gaps between chunks, tokens generated."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    generated = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                generated = int(event["usage"]["completion_tokens"])
            if any(choice.get("text") for choice in event.get("choices", [])):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the stream carried no text")
    return {"ttft_ms": (stamps[0] - start) * 1e3, "gaps_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
            "tokens": generated, "seconds": stamps[-1] - start}


def serving(artifact: Path, providers: str, levels: list[int], tokens: int, per_client: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from serving_load import server_process

    out: dict[str, Any] = {}
    with server_process([artifact], providers=providers) as url:
        stream_once(url, artifact.name, PROMPTS[0], 4)  # warm-up
        for clients in levels:
            jobs = [PROMPTS[i % len(PROMPTS)] for i in range(clients * per_client)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(lambda p: stream_once(url, artifact.name, p, tokens), jobs))
            wall = time.perf_counter() - start
            gaps = sorted(g for d in done for g in d["gaps_ms"])
            ttft = sorted(d["ttft_ms"] for d in done)
            out[str(clients)] = {
                "tokens_per_s": round(sum(d["tokens"] for d in done) / wall, 1),
                "ttft_ms_p50": round(ttft[len(ttft) // 2], 2),
                "ttft_ms_p99": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 2),
                "per_token_ms_p50": round(gaps[len(gaps) // 2], 2) if gaps else None,
                "per_token_ms_p99": round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 2) if gaps else None,
                "requests": len(done),
            }
    return out


COLD = """
import sys, time
start = float(sys.argv[1])
import jaonnx
model = jaonnx.load(sys.argv[2], providers=sys.argv[3])
model.generate("近年の機械学習は", max_new_tokens=1, do_sample=False)
print(time.time() - start)
"""


def cold_start(artifact: Path, providers: str) -> float:
    """Seconds from launching a fresh process to its first generated token (imports, session,
    CUDA initialisation and the first prefill included)."""
    env = {**os.environ, "JAONNX_CACHE_DIR": "off"}
    proc = subprocess.run([sys.executable, "-c", COLD, repr(time.time()), str(artifact), providers],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "cold start failed")
    return float(proc.stdout.strip().splitlines()[-1])


# ---- the run -----------------------------------------------------------------------------------


def section(results: dict[str, Any], name: str, fn: Any) -> Any:
    start = time.perf_counter()
    try:
        value = fn()
        results[name] = value
    except Exception as exc:  # a failed section is a result too; the others still run
        value = None
        results[name] = {"failed": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        traceback.print_exc()
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {json.dumps(results[name], ensure_ascii=False)[:600]}", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="default: 1b on cuda, tiny on cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/jaonnx_gpu_check"))
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="fewer steps and requests (the CPU dry run)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and args.providers == "cuda":
        ort.preload_dlls()
    shape = SHAPES[args.shape or ("1b" if args.providers == "cuda" else "tiny")]
    steps, rounds, new = (8, 1, 6) if args.quick else (64, 3, 16)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {
        "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "providers": args.providers, "shape": shape, "python": platform.python_version(),
    }
    if args.providers == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        results["error"] = "CUDAExecutionProvider is not available: install onnxruntime-gpu (benchmarks/gpu_check.sh)"
    if "error" in results:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        raise SystemExit(f"error: {results['error']}")
    weights = random_weights(shape)
    artifact = section(results, "build", lambda: str(build_artifact(shape, weights, args.work / "artifact")))
    if artifact is None:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        raise SystemExit(1)
    art = Path(artifact)
    vocab = shape["vocab_size"]
    prompts = [[5 + (7 * i + 3 * r) % (vocab - 10) for i in range(n)] for r, n in enumerate((9, 4, 13))]

    def check_greedy() -> dict[str, Any]:
        which, want, want_logits = zip(*(reference_greedy(weights, shape, p, new) for p in prompts))
        report: dict[str, Any] = {"reference": ",".join(sorted(set(which)))}
        for capture in (False, True):
            got, first = greedy_rows(decoder(art, args.providers, capture), prompts, new, spare=8)
            name = "captured" if capture else "uncaptured"
            report[f"equal_{name}"] = got == list(want)
            if got != list(want):  # where each row first differs (a near-tie, or a bug)
                report[f"first_difference_{name}"] = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
                                                      for g, w in zip(got, want)]
        diff = max(float(np.abs(f - w[-1]).max() / np.abs(w[-1]).max()) for f, w in zip(first, want_logits))
        report["max_logit_diff_over_scale"] = round(diff, 5)
        report["fp16_tolerance"] = 0.02
        report["ok"] = report["equal_uncaptured"] and report["equal_captured"] and diff <= 0.02
        return report

    def check_capture() -> dict[str, Any]:
        plain = join_leave(decoder(art, args.providers, False), prompts, 16, 48, 48)
        dec = decoder(art, args.providers, True)
        captured = join_leave(dec, prompts, 16, 48, 48)
        return {"identical": plain == captured, "graphs": [size for _, size in dec.graphs.captured]}

    def check_decode() -> dict[str, Any]:
        decs = {"uncaptured": decoder(art, args.providers, False), "captured": decoder(art, args.providers, True)}
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, dec in decs.items():
                for batch, context in ((1, 64), (1, 512), (5, 64), (8, 64)):  # 5 rows pad to bucket 8
                    key = f"{name}_b{batch}_ctx{context}_ms"
                    samples.setdefault(key, []).append(step_ms(dec, batch, context, steps, vocab))
                    dec.keep([])  # empty the batch: the next measurement starts with a fresh prefill
        out = {key: round(statistics.median(v), 3) for key, v in samples.items()}
        for name in decs:
            for batch in (5, 8):
                out[f"{name}_b{batch}_tokens_per_s"] = round(batch * 1000 / out[f"{name}_b{batch}_ctx64_ms"], 1)
        return out

    def check_bench() -> dict[str, Any]:
        from jaonnx.bench.artifact import bench_artifact

        r = bench_artifact(art, batches=(1, 8), context=64, new_tokens=steps, rounds=rounds, providers=args.providers,
                           bandwidth_gbs=1.0 if args.providers == "cpu" else None)
        return {k: r[k] for k in ("providers", "ttft_ms", "decode_ms_per_token", "bare_loop_ms_per_token",
                                  "tokens_per_s")}

    if "greedy" not in skip:
        section(results, "greedy", check_greedy)
    if "capture" not in skip:
        section(results, "capture", check_capture)
    if "decode" not in skip:
        section(results, "decode", check_decode)
    if "bench" not in skip:
        section(results, "bench", check_bench)
    if "serving" not in skip:
        levels = [1, 8] if args.quick else [1, 8, 32]
        section(results, "serving", lambda: serving(art, args.providers, levels, new if args.quick else 64,
                                                    1 if args.quick else 2))
    if "cold_start" not in skip:
        section(results, "cold_start_s", lambda: round(cold_start(art, args.providers), 2))
    decode = results.get("decode") or {}
    results["targets"] = {
        "b1_ctx64_ms": {"target": TARGETS["b1_ctx64_ms"], "got": decode.get("captured_b1_ctx64_ms")},
        "b1_ctx512_ms": {"target": TARGETS["b1_ctx512_ms"], "got": decode.get("captured_b1_ctx512_ms")},
        "b8_tokens_per_s": {"target": TARGETS["b8_tokens_per_s"], "got": decode.get("captured_b8_tokens_per_s")},
        "measured_on": args.providers,
    }
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
