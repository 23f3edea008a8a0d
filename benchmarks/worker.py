"""One measurement in a fresh process: `python -m benchmarks.worker KIND JSON` prints one JSON line.

Kinds: make_source, export, fill_mask, generation, decode, coldstart (engines: torch, jaonnx, optimum)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import timeit


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---- building -----------------------------------------------------------------------------


def make_source(a: dict[str, Any]) -> dict[str, Any]:
    """Random weights at a given shape + the twin's tokenizer files -> a checkpoint directory."""
    import shutil

    import torch
    import transformers

    twin, out = Path(a["twin"]), Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    for f in twin.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    config = transformers.AutoConfig.from_pretrained(twin)
    for k, v in a["config"].items():
        setattr(config, k, v)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = getattr(transformers, a["architecture"])(config).eval()
    vocab = transformers.AutoConfig.from_pretrained(twin).vocab_size
    if a["architecture"] == "GPT2LMHeadModel" and config.vocab_size > vocab:
        # The tokenizer knows `vocab` ids: zero rows (logit exactly 0) keep greedy decoding on
        # them, since the max of thousands of random logits is positive. Cost is unchanged.
        with torch.no_grad():
            model.get_output_embeddings().weight[vocab:] = 0
    model.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def export(a: dict[str, Any]) -> dict[str, Any]:
    from jaonnx_export import precision
    from jaonnx_export.export import export as run

    precision.QUALITY_TEXTS = a.get("quality_texts", 8)
    start = time.perf_counter()
    manifest = run(a["src"], a["out"], quantize=a.get("quantize"), dtype=a.get("dtype", "fp32"), force=True)
    return {"seconds": time.perf_counter() - start, "quality": manifest.quality, "peak_rss_mib": _peak_rss_mib()}


# ---- fill-mask ----------------------------------------------------------------------------


def _fill_mask_engine(engine: str, path: str, threads: int) -> Any:
    """A callable texts -> top-5 predictions per text, tokenization included."""
    if engine == "jaonnx":
        import jaonnx

        model = jaonnx.load(path, providers="cpu")
        return lambda texts: model(texts, top_k=5)
    import torch

    _torch_threads(threads)
    if engine == "optimum":
        from optimum.onnxruntime import ORTModelForMaskedLM
        from transformers import AutoTokenizer

        model = ORTModelForMaskedLM.from_pretrained(path, export=True)
    else:
        import transformers
        from transformers import AutoTokenizer

        model = transformers.AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)

    def run(texts: list[str]) -> Any:
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits
        rows, cols = (enc["input_ids"] == tok.mask_token_id).nonzero(as_tuple=True)
        probs = logits[rows, cols].softmax(-1)
        top = probs.topk(5, dim=-1)
        return [[tok.decode([int(t)]) for t in row] for row in top.indices]

    return run


def fill_mask(a: dict[str, Any]) -> dict[str, Any]:
    run = _fill_mask_engine(a["engine"], a["path"], a["threads"])
    out: dict[str, Any] = {"latency": {}, "throughput": {}}
    for seq, text in a["texts_by_seq"].items():
        out["latency"][seq] = timeit(lambda: run([text]), a["repeat"])
    for batch in a["batches"]:
        texts = (a["sentences"] * batch)[:batch]
        t = timeit(lambda: run(texts), max(3, a["repeat"] // 3), warmup=1)
        out["throughput"][str(batch)] = {"texts_per_s": batch / (t["p50"] / 1000), **t}
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


# ---- generation ---------------------------------------------------------------------------


class _TorchDecoder:
    def __init__(self, path: str, threads: int) -> None:
        import torch
        import transformers

        _torch_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        self.past: Any = None

    def prefill(self, ids: np.ndarray) -> None:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values

    def step(self, token: int, batch: int) -> None:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.full((batch, 1), token), past_key_values=self.past,
                             use_cache=True)
        self.past = out.past_key_values
        out.logits[:, -1].argmax(-1)

    def generate(self, prompts: list[str], new: int) -> None:
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        with self.torch.no_grad():
            self.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=self.tok.pad_token_id or 0)


class _JaonnxDecoder:
    def __init__(self, path: str, threads: int) -> None:
        import jaonnx

        self.gen = jaonnx.load(path, providers="cpu")
        self.dec = self.gen.decoder
        self.length = 0

    def prefill(self, ids: np.ndarray) -> None:
        b, n = ids.shape
        self.dec.reset(b)
        self.dec.forward(ids, np.ones((b, n), np.int64), np.tile(np.arange(n, dtype=np.int64), (b, 1)), keep=1)
        self.length = n

    def step(self, token: int, batch: int) -> None:
        self.length += 1
        logits = self.dec.forward(np.full((batch, 1), token, np.int64), np.ones((batch, self.length), np.int64),
                                  np.full((batch, 1), self.length - 1, np.int64), keep=1)
        logits[:, -1].argmax(-1)

    def generate(self, prompts: list[str], new: int) -> None:
        self.gen.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def _decoder(engine: str, path: str, threads: int) -> Any:
    return _JaonnxDecoder(path, threads) if engine == "jaonnx" else _TorchDecoder(path, threads)


def generation(a: dict[str, Any]) -> dict[str, Any]:
    d = _decoder(a["engine"], a["path"], a["threads"])
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"prefill": {}, "decode": {}, "tokens_per_s": {}}
    for n in a["prefill"]:
        ids = rng.integers(5, 2000, (1, n), dtype=np.int64)
        out["prefill"][str(n)] = timeit(lambda: d.prefill(ids), a["repeat"], warmup=1)
    for ctx in a["decode"]:
        out["decode"][str(ctx)] = _decode_steps(d, ctx, a["steps"], rng)
    for batch in a["batches"]:
        prompts = (a["prompts"] * batch)[:batch]
        t = timeit(lambda: d.generate(prompts, a["new_tokens"]), 2, warmup=1)
        out["tokens_per_s"][str(batch)] = {"tokens_per_s": batch * a["new_tokens"] / (t["p50"] / 1000), **t}
    out["ttft"] = timeit(lambda: d.generate([a["ttft_prompt"]], 1), a["repeat"], warmup=1)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _decode_steps(d: Any, ctx: int, steps: int, rng: Any) -> dict[str, float]:
    """Per-token decode latency at context `ctx`: prefill ctx tokens, then time single steps."""
    d.prefill(rng.integers(5, 2000, (1, ctx), dtype=np.int64))
    d.step(7, 1)  # warm
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        d.step(7, 1)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": float(np.median(times)), "p90": float(np.percentile(times, 90)), "n": steps}


def decode(a: dict[str, Any]) -> dict[str, Any]:
    """Only per-token decode at one context (the 1B shape: memory-bound, run alone)."""
    d = _decoder(a["engine"], a["path"], a["threads"])
    rng = np.random.default_rng(0)
    return {"decode": {str(c): _decode_steps(d, c, a["steps"], rng) for c in a["decode"]},
            "peak_rss_mib": _peak_rss_mib()}


# ---- cold start ---------------------------------------------------------------------------


def coldstart(a: dict[str, Any]) -> dict[str, Any]:
    """Import, load and produce the first result; the parent times process start -> result."""
    if a["task"] == "fill-mask":
        run = _fill_mask_engine(a["engine"], a["path"], a["threads"])
        run([a["text"]])
    elif a["engine"] == "jaonnx":
        import jaonnx

        jaonnx.load(a["path"], providers="cpu").generate(a["text"], max_new_tokens=1, do_sample=False)
    else:
        _TorchDecoder(a["path"], a["threads"]).generate([a["text"]], 1)
    return {"result_at": time.time(), "peak_rss_mib": _peak_rss_mib()}


KINDS = {f.__name__: f for f in (make_source, export, fill_mask, generation, decode, coldstart)}

if __name__ == "__main__":
    result = KINDS[sys.argv[1]](json.loads(sys.argv[2]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
