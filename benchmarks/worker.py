"""One measurement in a fresh process: `python -m benchmarks.worker KIND JSON` prints one JSON line.

Kinds: make_source, export, fill_mask, generation, decode, coldstart. Engines: torch, jaonnx and the
peers (optimum, openvino, ctranslate2, genai, llamacpp), each peer run with its own venv's python. Only the
engine's own imports happen here, so a peer venv needs none of the others."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.bench import peak_rss_mib, stats, time_calls
from jaonnx.bench.timing import interleave


def _peak_rss_mib() -> float:
    return peak_rss_mib() or 0.0


def timeit(fn: Any, repeat: int, warmup: int = 1) -> dict[str, Any]:
    """Median/min/max/spread (ms) of `repeat` calls of `fn` after `warmup` untimed ones."""
    return stats(time_calls(fn, repeat, warmup)).to_dict()


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
    manifest = run(a["src"], a["out"], quantize=a.get("quantize"), dtype=a.get("dtype", "fp32"), force=True,
                   optimize=a.get("optimize", False))
    return {"seconds": time.perf_counter() - start, "quality": manifest.quality, "peak_rss_mib": _peak_rss_mib()}


# ---- fill-mask ----------------------------------------------------------------------------


def _hf_fill_mask_model(engine: str, path: str, a: dict[str, Any]) -> Any:
    """PyTorch, or a peer's model exported once into its cache directory (reused by later rounds)."""
    cache = Path(a["peer_cache"]) if a.get("peer_cache") else None
    if engine == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForMaskedLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = a["threads"]
        if cache and (cache / "model.onnx").is_file():
            return ORTModelForMaskedLM.from_pretrained(cache, session_options=options)
        model = ORTModelForMaskedLM.from_pretrained(path, export=True, session_options=options)
        if cache:
            model.save_pretrained(cache)
        return model
    if engine == "openvino":
        from optimum.intel import OVModelForMaskedLM

        config = {"INFERENCE_NUM_THREADS": str(a["threads"])}
        if cache and (cache / "openvino_model.xml").is_file():
            return OVModelForMaskedLM.from_pretrained(cache, ov_config=config)
        model = OVModelForMaskedLM.from_pretrained(path, export=True, load_in_8bit=a.get("int8", False), ov_config=config)
        if cache:
            model.save_pretrained(cache)
        return model
    import torch
    import transformers

    return transformers.AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()


def _fill_mask_engine(engine: str, path: str, threads: int, a: dict[str, Any] | None = None) -> Any:
    """A callable texts -> top-5 predictions per text, tokenization included (plus, for the
    HF-style engines, the model and tokenizer, for the plain-forward sanity check)."""
    if engine == "jaonnx":
        import jaonnx

        model = jaonnx.load(path, providers="cpu", intra_op_threads=threads)
        return lambda texts: model(texts, top_k=5)
    import torch
    from transformers import AutoTokenizer

    _torch_threads(threads)
    model = _hf_fill_mask_model(engine, path, {"threads": threads, **(a or {})})
    tok = AutoTokenizer.from_pretrained(path)

    def run(texts: list[str]) -> Any:
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits
        rows, cols = (enc["input_ids"] == tok.mask_token_id).nonzero(as_tuple=True)
        top = logits[rows, cols].softmax(-1).topk(5, dim=-1)
        return [[tok.decode([int(t)]) for t in row] for row in top.indices]

    run.model, run.tok = model, tok  # type: ignore[attr-defined]
    return run


def fill_mask(a: dict[str, Any]) -> dict[str, Any]:
    run = _fill_mask_engine(a["engine"], a["path"], a["threads"], a)
    out: dict[str, Any] = {"latency": {}, "throughput": {}}
    for seq, text in a["texts_by_seq"].items():
        out["latency"][seq] = timeit(lambda: run([text]), a["repeat"])
    if a["engine"] == "torch":
        # Baseline sanity: the pipeline (tokenize, forward, top-k at the masks) against a plain
        # forward on the same ids, interleaved, at the longest length.
        import torch

        seq, text = list(a["texts_by_seq"].items())[-1]
        enc = run.tok([text], return_tensors="pt")

        def plain() -> None:
            with torch.no_grad():
                run.model(**enc)

        both = interleave({"pipeline": lambda: time_calls(lambda: run([text]), 1, 0)[0],
                           "plain": lambda: time_calls(plain, 1, 0)[0]}, max(3, a["repeat"] // 2))
        out["sanity"] = {"seq": seq, "pipeline_ms": stats(both["pipeline"]).to_dict(),
                         "plain_forward_ms": stats(both["plain"]).to_dict(), "torch_threads": torch.get_num_threads()}
    for batch in a["batches"]:
        texts = (a["sentences"] * batch)[:batch]
        t = timeit(lambda: run(texts), max(3, a["repeat"] // 3), warmup=1)
        out["throughput"][str(batch)] = {"texts_per_s": batch / (t["median"] / 1000), **t}
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


# ---- generation ---------------------------------------------------------------------------
# Every engine offers `generate(prompt_ids, texts, n)` (n new greedy tokens, all rows). Decode
# per token is (T(n + 1 tokens) - T(1 token)) / n, so prefill and the first step cancel out and
# what a user's loop pays per token remains. PyTorch's column instead times bare model steps
# (no HF generate overhead): the baseline is the fastest torch loop, not the easiest one.


class _TorchDecoder:
    def __init__(self, path: str, threads: int) -> None:
        import torch
        import transformers

        _torch_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.past: Any = None

    def prefill(self, ids: np.ndarray) -> None:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values

    def step(self, token: int, batch: int) -> None:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.full((batch, 1), token), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        out.logits[:, -1].argmax(-1)

    def generate(self, ids: list[list[int]], texts: list[str], n: int) -> None:
        t = self.torch.tensor(ids)
        with self.torch.no_grad():
            self.model.generate(input_ids=t, attention_mask=self.torch.ones_like(t), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)


class _HFGenerate:
    """Optimum ORTModel and optimum-intel OpenVINO: HF `generate` over their own runtimes."""

    def __init__(self, engine: str, path: str, threads: int, a: dict[str, Any]) -> None:
        import torch

        _torch_threads(threads)
        self.torch = torch
        cache = Path(a["peer_cache"])
        if engine == "optimum":
            from optimum.onnxruntime import ORTModelForCausalLM
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            if (cache / "config.json").is_file():
                self.model = ORTModelForCausalLM.from_pretrained(cache, session_options=options)
            else:
                self.model = ORTModelForCausalLM.from_pretrained(path, export=True, session_options=options)
                self.model.save_pretrained(cache)
        else:
            from optimum.intel import OVModelForCausalLM

            config = {"INFERENCE_NUM_THREADS": str(threads)}
            if (cache / "openvino_model.xml").is_file():
                self.model = OVModelForCausalLM.from_pretrained(cache, ov_config=config)
            else:
                self.model = OVModelForCausalLM.from_pretrained(path, export=True, load_in_8bit=a.get("int8", False),
                                                                ov_config=config)
                self.model.save_pretrained(cache)

    def generate(self, ids: list[list[int]], texts: list[str], n: int) -> None:
        t = self.torch.tensor(ids)
        self.model.generate(input_ids=t, attention_mask=self.torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)


class _CT2:
    def __init__(self, path: str, threads: int, a: dict[str, Any]) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        cache = Path(a["peer_cache"])
        if not (cache / "model.bin").is_file():
            _pad_ct2_vocabulary()
            ctranslate2.converters.TransformersConverter(path).convert(str(cache), force=True)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.gen = ctranslate2.Generator(str(cache), device="cpu", compute_type="int8" if a.get("int8") else "float32",
                                         intra_threads=threads, inter_threads=1)

    def generate(self, ids: list[list[int]], texts: list[str], n: int) -> int:
        """n new greedy tokens; returns how many came out (checked once: CT2's max_length
        semantics with include_prompt_in_result=False)."""
        tokens = [self.tok.convert_ids_to_tokens(row) for row in ids]
        out = self.gen.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                      include_prompt_in_result=False)
        got = len(out[0].sequences_ids[0])
        if got != n:
            raise RuntimeError(f"CTranslate2 generated {got} tokens where {n} were asked")
        return got


def _pad_ct2_vocabulary() -> None:
    """The random checkpoints have more embedding rows than the twin tokenizer has pieces (the
    real shape's vocab); CT2's converter insists they match, so name the extra ids."""
    from ctranslate2.converters import transformers as ct2t

    loader = ct2t._MODEL_LOADERS["GPT2Config"]
    original = type(loader).get_vocabulary

    def padded(self: Any, model: Any, tokenizer: Any) -> list[str]:
        tokens = original(self, model, tokenizer)
        return tokens + [f"<unused{i}>" for i in range(model.config.vocab_size - len(tokens))]

    type(loader).get_vocabulary = padded


class _GenAI:
    """onnxruntime-genai's C++ loop over a copy of jaonnx's graph (prepared by the parent)."""

    def __init__(self, path: str, threads: int, a: dict[str, Any]) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        self.model = og.Model(config)

    def generate(self, ids: list[list[int]], texts: list[str], n: int) -> None:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids[0]) + n, min_length=len(ids[0]) + n, do_sample=False,
                                  batch_size=len(ids))
        g = og.Generator(self.model, params)
        g.append_tokens(np.array(ids, dtype=np.int32))
        while not g.is_done():
            g.generate_next_token()


class _LlamaCpp:
    """llama.cpp through llama-cpp-python's Llama (its C loop; this class only feeds token ids
    and takes the argmax, as greedy decoding does): `path` is a GGUF file (gguf_writer.py)."""

    def __init__(self, path: str, threads: int, a: dict[str, Any]) -> None:
        import llama_cpp

        from .gguf_writer import last_logits

        self.last_logits = last_logits
        self.llm = llama_cpp.Llama(path, n_ctx=a.get("n_ctx", 1024), n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=bool(a.get("flash_attn")), use_mmap=True,
                                   verbose=False)

    def generate(self, ids: list[list[int]], texts: list[str], n: int) -> list[int]:
        if len(ids) != 1:
            raise RuntimeError("llama-cpp-python's Llama decodes one sequence")
        llm = self.llm
        llm.reset()
        llm.eval(ids[0])
        out: list[int] = []
        while True:
            out.append(int(np.argmax(self.last_logits(llm))))
            if len(out) == n:
                return out
            llm.eval(out[-1:])


class _Jaonnx:
    def __init__(self, path: str, threads: int, a: dict[str, Any]) -> None:
        import jaonnx

        self.gen = jaonnx.load(path, providers="cpu", intra_op_threads=threads)

    def generate(self, ids: list[list[int]], texts: list[str], n: int, **extra: Any) -> None:
        self.gen.generate(texts, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)


def _engine(a: dict[str, Any]) -> Any:
    e, path, threads = a["engine"], a["path"], a["threads"]
    if e == "torch":
        return _TorchDecoder(path, threads)
    if e in ("optimum", "openvino"):
        return _HFGenerate(e, path, threads, a)
    if e == "ctranslate2":
        return _CT2(path, threads, a)
    if e == "genai":
        return _GenAI(path, threads, a)
    if e == "llamacpp":
        return _LlamaCpp(path, threads, a)
    return _Jaonnx(path, threads, a)


def _per_token(d: Any, ids: list[int], text: str, n: int, repeat: int) -> dict[str, Any]:
    """Decode ms/token at batch 1 from generate: (T(n+1) - T(1)) / n over interleaved repeats."""
    one = lambda: time_calls(lambda: d.generate([ids], [text], 1), 1, 0)[0]  # noqa: E731
    many = lambda: time_calls(lambda: d.generate([ids], [text], n + 1), 1, 0)[0]  # noqa: E731
    d.generate([ids], [text], 2)
    s = interleave({"one": one, "many": many}, repeat)
    return {**stats([(m - o) / n for m, o in zip(s["many"], s["one"])]).to_dict(), "first_ms": stats(s["one"]).to_dict()}


def generation(a: dict[str, Any]) -> dict[str, Any]:
    d = _engine(a)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"prefill": {}, "decode": {}, "tokens_per_s": {}}
    torch_steps = isinstance(d, _TorchDecoder)
    for ctx, (ids, text) in a["contexts"].items():
        if torch_steps:
            out["decode"][ctx] = _decode_steps(d, int(ctx), a["steps"], rng)
            out["prefill"][ctx] = timeit(lambda: d.prefill(np.array([ids])), a["repeat"], warmup=1)
        else:
            r = _per_token(d, ids, text, a["steps"], a["repeat"])
            out["decode"][ctx], out["prefill"][ctx] = r, r.pop("first_ms")
    ids, text = a["contexts"][min(a["contexts"], key=int)]
    for batch in a["batches"]:
        t = timeit(lambda: d.generate([ids] * batch, [text] * batch, a["new_tokens"]), 2, warmup=1)
        out["tokens_per_s"][str(batch)] = {"tokens_per_s": batch * a["new_tokens"] / (t["median"] / 1000), **t}
    if isinstance(d, _Jaonnx):
        out |= _jaonnx_extras(d, a)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _jaonnx_extras(d: _Jaonnx, a: dict[str, Any]) -> dict[str, Any]:
    """The bare ORT loop over the same graph (per-token work outside the graph = the gap) and
    prompt lookup on an input-grounded prompt, where the generate API offers it."""
    from jaonnx.bench.bare import BareDecoder
    from jaonnx.generation import GENERATION_OPTIONS

    extra: dict[str, Any] = {"bare_decode": {}}
    bare = BareDecoder(a["path"], threads=a["threads"])
    for ctx in a["contexts"]:
        bare.step_times(int(ctx), 2)
        extra["bare_decode"][ctx] = stats([stats(bare.step_times(int(ctx), a["steps"])).median
                                           for _ in range(a["repeat"])]).to_dict()
    if "prompt_lookup" not in {option.name for option in GENERATION_OPTIONS}:
        extra["prompt_lookup"] = {"error": "unavailable: generate() has no prompt_lookup option yet"}
        return extra
    text, n = a["lookup_prompt"], a["new_tokens"]
    runs = interleave({
        "plain": lambda: time_calls(lambda: d.generate([], [text], n), 1, 1)[0],
        "lookup": lambda: time_calls(lambda: d.generate([], [text], n, prompt_lookup=a["lookup_n"]), 1, 1)[0],
    }, a["repeat"])
    extra["prompt_lookup"] = {k: {"tokens_per_s": n / (stats(v).median / 1000), **stats(v).to_dict()}
                              for k, v in runs.items()}
    return extra


def _decode_steps(d: Any, ctx: int, steps: int, rng: Any) -> dict[str, Any]:
    """PyTorch: per-token decode latency at context `ctx` from bare model steps."""
    d.prefill(rng.integers(5, 2000, (1, ctx), dtype=np.int64))
    d.step(7, 1)  # warm
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        d.step(7, 1)
        times.append((time.perf_counter() - start) * 1000)
    return stats(times).to_dict()


def decode(a: dict[str, Any]) -> dict[str, Any]:
    """Only per-token decode (the 1B shape: memory-bound, run alone)."""
    d = _engine(a)
    rng = np.random.default_rng(0)
    res = {}
    for ctx, (ids, text) in a["contexts"].items():
        if isinstance(d, _TorchDecoder):
            res[ctx] = _decode_steps(d, int(ctx), a["steps"], rng)
        else:
            res[ctx] = _per_token(d, ids, text, a["steps"], a["repeat"])
            res[ctx].pop("first_ms")
    return {"decode": res, "peak_rss_mib": _peak_rss_mib()}


def decode_rows(a: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 rows for the side-by-side with llama.cpp (benchmarks/llamacpp.py): decode ms/token
    at each context, prefill (time to the first token) of `prefill` ids, peak RSS."""
    d = _engine(a)
    res: dict[str, Any] = {"decode": {}}
    for ctx, (ids, text) in a["contexts"].items():
        res["decode"][ctx] = _per_token(d, ids, text, a["steps"], a["repeat"])
        res["decode"][ctx].pop("first_ms")
    ids, text = a["prefill"]
    res["prefill"] = timeit(lambda: d.generate([ids], [text], 1), a["repeat"], warmup=1)
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


# ---- cold start ---------------------------------------------------------------------------


def coldstart(a: dict[str, Any]) -> dict[str, Any]:
    """Import, load and produce the first result; the parent times process start -> result."""
    if a["task"] == "fill-mask":
        run = _fill_mask_engine(a["engine"], a["path"], a["threads"])
        run([a["text"]])
    elif a["engine"] == "jaonnx":
        import jaonnx

        jaonnx.load(a["path"], providers="cpu").generate(a["text"], max_new_tokens=1, do_sample=False)
    elif a["engine"] == "llamacpp":
        _LlamaCpp(a["path"], a["threads"], a).generate([a["ids"]], [a["text"]], 1)
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(a["path"])(a["text"])["input_ids"]
        _TorchDecoder(a["path"], a["threads"]).generate([ids], [a["text"]], 1)
    return {"result_at": time.time(), "peak_rss_mib": _peak_rss_mib()}


KINDS = {f.__name__: f for f in (make_source, export, fill_mask, generation, decode, decode_rows, coldstart)}

if __name__ == "__main__":
    result = KINDS[sys.argv[1]](json.loads(sys.argv[2]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
