"""`jaonnx bench ART`: what an artifact does on this machine, like llama.cpp's llama-bench.

Decoders: time to first token, ms/token at batch 1 (from `generate`, so everything a user pays),
tokens/s at batch 1 and 8, the same graph in a bare ORT loop (the gap is the per-token work
outside the graph), and the floor (bytes read per token / read bandwidth). Fill-mask: latency
at two lengths and texts/s at batch 1 and 8. Every number is the median of interleaved rounds."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifact import read_manifest
from ..errors import JaonnxError
from ..session import default_threads
from .bare import BareDecoder
from .floor import floor_ms, kv_bytes, weight_bytes
from .machine import read_bandwidth_gbs
from .profile import summarize_profile
from .prompts import prefix_with_tokens
from .rss import peak_rss_of_run
from .timing import interleave, stats, time_calls


def _timed(fn: Callable[[], Any]) -> Callable[[], float]:
    return lambda: time_calls(fn, 1, warmup=0)[0]


def bench_artifact(directory: str | Path, *, threads: int | None = None, batches: tuple[int, ...] = (1, 8),
                   context: int = 64, new_tokens: int = 32, rounds: int = 3, profile: bool = False,
                   bandwidth_gbs: float | None = None, log: Callable[[str], None] = lambda m: None,
                   providers: str = "cpu") -> dict[str, Any]:
    """`providers` other than "cpu" (e.g. "cuda") measure the same figures there; the CPU-only
    ones (read bandwidth, its floor, peak RSS) are then left out (None)."""
    import jaonnx

    if rounds < 1 or new_tokens < 2 or context < 1 or not batches or min(batches) < 1 or (threads or 1) < 1:
        raise JaonnxError("--rounds, --context, --threads and --batches must be >= 1 and --new-tokens >= 2")
    manifest = read_manifest(directory)
    threads = threads or default_threads()
    model = jaonnx.load(directory, providers=providers, intra_op_threads=threads)
    on_cpu = providers == "cpu"
    result: dict[str, Any] = {
        "artifact": str(directory), "recipe": manifest.recipe, "task": manifest.task,
        "precision": manifest.quantization or manifest.dtype, "threads": threads, "rounds": rounds,
        "providers": model.session.get_providers()[0], "peak_rss_mib": None,
    }
    if on_cpu:
        log("measuring read bandwidth")
    result["bandwidth_gbs"] = bandwidth_gbs or (read_bandwidth_gbs(threads=result["threads"]) if on_cpu else None)
    if manifest.task == "text-generation":
        result |= _decoder(model, manifest, directory, result, batches, context, new_tokens, rounds, log, providers)
    else:
        result |= _fill_mask(model, batches, rounds, log)
    if on_cpu:
        log(f"peak RSS: a fresh process loads the artifact and runs it at batch {max(batches)}")
        result["peak_rss_mib"] = peak_rss_of_run(directory, max(batches), threads)
        result["peak_rss_batch"] = max(batches)
    if profile:
        log("profiling (a separate session with ORT's profiler on)")
        result["profile"] = _profile(directory, manifest.task, threads, context, providers)
    return result


def _decoder(gen: Any, manifest: Any, directory: Any, head: dict[str, Any], batches: tuple[int, ...], context: int,
             new: int, rounds: int, log: Callable[[str], None], providers: str = "cpu") -> dict[str, Any]:
    prompt = prefix_with_tokens(lambda t: len(gen.encode(t)), context)
    greedy = {"do_sample": False}

    def run(prompts: list[str], n: int) -> Callable[[], float]:
        return _timed(lambda: gen.generate(prompts, max_new_tokens=n, min_new_tokens=n, **greedy))

    gen.generate([prompt], max_new_tokens=2, min_new_tokens=2, **greedy)  # warm-up
    bare = BareDecoder(directory, threads=head["threads"], providers=providers)
    bare.step_times(context, 2)
    log(f"decode at context {context}: generate vs a bare ORT loop, {rounds} interleaved rounds")
    candidates = {"first": run([prompt], 1), "long": run([prompt], new + 1),
                  "bare": lambda: stats(bare.step_times(context, new)).median}
    for b in batches:
        candidates[f"batch{b}"] = run([prompt] * b, new)
    samples = interleave(candidates, rounds)
    per_token = [(lg - f) / new for lg, f in zip(samples["long"], samples["first"])]
    read = weight_bytes(Path(directory) / manifest.model_file)
    kv = kv_bytes(manifest.decoder, context, manifest.dtype) if manifest.decoder else 0
    floor = floor_ms(read[0] + kv, head["bandwidth_gbs"]) if head["bandwidth_gbs"] else None
    decode = stats(per_token)
    bare_stats = stats(samples["bare"])
    return {
        "context": context, "new_tokens": new,
        "ttft_ms": stats(samples["first"]).to_dict(),
        "decode_ms_per_token": decode.to_dict(),
        "bare_loop_ms_per_token": bare_stats.to_dict(),
        "overhead_ms_per_token": stats([g - b for g, b in zip(per_token, samples["bare"])]).to_dict(),
        "tokens_per_s": {str(b): stats([b * new / (t / 1000) for t in samples[f"batch{b}"]]).to_dict() for b in batches},
        "weight_bytes": read[0], "weight_bytes_method": read[1], "kv_bytes": kv,
        "floor_ms_per_token": floor, "floor_ratio": decode.median / floor if floor else None,
    }


def _fill_mask(model: Any, batches: tuple[int, ...], rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    mask = model.recipe.special.mask or "[MASK]"
    count = lambda t: len(model.tokenizer.encode_masked(t))  # noqa: E731
    texts = {seq: prefix_with_tokens(count, seq, mask) for seq in (32, 128)}
    short = prefix_with_tokens(count, 24, mask)
    model([short])  # warm-up
    log(f"fill-mask latency and throughput, {rounds} interleaved rounds")
    candidates = {f"seq{s}": _timed(lambda t=t: model([t])) for s, t in texts.items()}
    for b in batches:
        candidates[f"batch{b}"] = _timed(lambda b=b: model([short] * b))
    samples = interleave(candidates, rounds)
    return {
        "latency_ms": {str(s): stats(samples[f"seq{s}"]).to_dict() for s in texts},
        "texts_per_s": {str(b): stats([b / (t / 1000) for t in samples[f"batch{b}"]]).to_dict() for b in batches},
        "floor_ratio": None,  # encoders at these lengths are compute-bound: no bandwidth floor
    }


def _profile(directory: Any, task: str, threads: int | None, context: int, providers: str = "cpu") -> list[dict[str, Any]]:
    import jaonnx

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # ORT writes the trace into the working directory
        try:
            model = jaonnx.load(directory, providers=providers, intra_op_threads=threads, profile=True)
            if task == "text-generation":
                model.generate([prefix_with_tokens(lambda t: len(model.encode(t)), context)], max_new_tokens=16,
                               min_new_tokens=16, do_sample=False)
            else:
                mask = model.recipe.special.mask or "[MASK]"
                model([prefix_with_tokens(lambda t: len(model.tokenizer.encode_masked(t)), 64, mask)] * 4)
            trace = model.session.end_profiling()
            return summarize_profile(Path(scratch) / trace)
        finally:
            os.chdir(cwd)
