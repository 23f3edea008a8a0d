"""CUDA decode figures for the japanese-gpt-1b shape (issue 10), on a lent GPU machine.

Random weights at the real shape (24 layers, 2048 hidden, 16 heads, vocab 44928), built with
the exporter's static-cache graph builder (no torch needed) and converted to fp16 with the
exporter's converter. Measured, interleaved, on the CUDA execution provider:

1. `StaticBatchDecoder` (the engine's batch: IO binding, the KV cache in place on the GPU):
   ms/token at batch 1 and 8, context 64 and 512;
2. the same decode step bound once to fixed device buffers and replayed with and without
   ONNX Runtime's CUDA graph (`enable_cuda_graph`), batch 1.

    PYTHONPATH=runtime:export python benchmarks/gpu_decode.py --out results.json [--tiny]

`--tiny` runs a 2-layer toy shape (also on CPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

GPT_1B = dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=44928, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=1024)


class _Tensor:
    """Just enough of a torch tensor for `decoder_graph.build` (numpy underneath)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def detach(self) -> _Tensor:
        return self

    def to(self, _: str) -> _Tensor:
        return self

    def float(self) -> _Tensor:
        return self

    def numpy(self) -> np.ndarray:
        return self.array

    def data_ptr(self) -> int:
        return self.array.ctypes.data


def random_gpt2(shape: dict[str, int], seed: int = 0) -> Any:
    """A duck-typed GPT2LMHeadModel with random weights (tied LM head)."""
    rng = np.random.default_rng(seed)
    n, v, p = shape["n_embd"], shape["vocab_size"], shape["n_positions"]

    def r(*dims: int) -> _Tensor:
        return _Tensor(rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02))

    def ones(d: int) -> _Tensor:
        return _Tensor(np.ones(d, np.float32))

    def zeros(d: int) -> _Tensor:
        return _Tensor(np.zeros(d, np.float32))

    sd = {"transformer.wte.weight": r(v, n), "transformer.wpe.weight": r(p, n),
          "transformer.ln_f.weight": ones(n), "transformer.ln_f.bias": zeros(n)}
    for i in range(shape["n_layer"]):
        h = f"transformer.h.{i}"
        sd |= {f"{h}.ln_1.weight": ones(n), f"{h}.ln_1.bias": zeros(n), f"{h}.ln_2.weight": ones(n),
               f"{h}.ln_2.bias": zeros(n), f"{h}.attn.c_attn.weight": r(n, 3 * n), f"{h}.attn.c_attn.bias": zeros(3 * n),
               f"{h}.attn.c_proj.weight": r(n, n), f"{h}.attn.c_proj.bias": zeros(n),
               f"{h}.mlp.c_fc.weight": r(n, 4 * n), f"{h}.mlp.c_fc.bias": zeros(4 * n),
               f"{h}.mlp.c_proj.weight": r(4 * n, n), f"{h}.mlp.c_proj.bias": zeros(n)}
    config = SimpleNamespace(**shape, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                             scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    wte = sd["transformer.wte.weight"]
    return SimpleNamespace(config=config, state_dict=lambda: sd, lm_head=SimpleNamespace(weight=wte),
                           transformer=SimpleNamespace(wte=SimpleNamespace(weight=wte)))


def build_fp16(shape: dict[str, int], work: Path) -> tuple[Path, Any]:
    from jaonnx.artifact import Manifest
    from jaonnx_export import decoder_graph

    fp32 = work / "fp32" / "model.onnx"
    fp32.parent.mkdir(parents=True, exist_ok=True)
    model = random_gpt2(shape)
    decoder_graph.build(model, fp32)
    del model
    out = work / "fp16" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    convert = _fp16_converter()
    convert(fp32, out, "model.onnx.data")
    inputs, outputs = _io_dtypes(out)
    manifest = Manifest(recipe="rinna-gpt-1b", task="text-generation", model_file="model.onnx",
                        tokenizer_file="spiece.model", special_ids={}, vocab_size=shape["vocab_size"],
                        max_positions=shape["n_positions"], inputs=inputs, outputs=outputs, dtype="fp16",
                        decoder=decoder_graph.decoder_shape(SimpleNamespace(**shape)))
    return out, manifest


def _fp16_converter() -> Any:
    for module in ("jaonnx_export.quantize", "jaonnx_export.precision"):
        try:
            return __import__(module, fromlist=["convert_fp16"]).convert_fp16
        except (ImportError, AttributeError):
            continue
    raise SystemExit("no convert_fp16 in jaonnx_export")


def _io_dtypes(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
    table = lambda values: {v.name: names[v.type.tensor_type.elem_type] for v in values}  # noqa: E731
    return table(model.graph.input), table(model.graph.output)


def session(path: Path, provider: str, cuda_graph: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if provider == "cuda":
        providers: list[Any] = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}),
                                "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def engine_decode(sess: Any, manifest: Any, batch: int, context: int, steps: int) -> float:
    """ms/token of StaticBatchDecoder.step after a prefill of `context` tokens per row."""
    from jaonnx.generation.static_cache import StaticBatchDecoder

    dec = StaticBatchDecoder(sess, manifest)
    prompt = [5 + i % (manifest.vocab_size - 10) for i in range(context)]
    logits = dec.add([prompt] * batch, reserve=context + steps + 8)
    tokens = logits.argmax(-1)
    for _ in range(3):
        tokens = dec.step(tokens[:, None])[:, -1].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = dec.step(tokens[:, None])[:, -1].argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def fixed_binding_decode(sess: Any, manifest: Any, context: int, steps: int, device: str) -> float:
    """ms/token of a decode step bound once to fixed device buffers (what a CUDA graph needs):
    only the buffers' contents change between steps."""
    import onnxruntime as ort

    shape, dtype = manifest.decoder, np.float16 if manifest.dtype == "fp16" else np.float32
    capacity = context + steps + 8
    cache = np.zeros((1, shape.num_heads, capacity, shape.head_dim), dtype=dtype)
    ov = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)  # noqa: E731
    pasts = {n: ov(cache) for n in manifest.inputs if n.startswith("past_key_values.")}
    ids, pos = ov(np.array([[7]], np.int64)), ov(np.array([[context]], np.int64))
    seqlens = ov(np.array([context], np.int32))
    total = ov(np.array(capacity, np.int32))
    keep = ov(np.array([1], np.int64))
    logits = ov(np.zeros((1, 1, manifest.vocab_size), np.float32))
    binding = sess.io_binding()
    for name, value in (("input_ids", ids), ("position_ids", pos), ("seqlens_k", seqlens),
                        ("total_sequence_length", total), ("logits_to_keep", keep)):
        binding.bind_ortvalue_input(name, value)
    for name, value in pasts.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("present." + name[len("past_key_values."):], value)
    binding.bind_ortvalue_output("logits", logits)
    token = 7
    times = []
    for step in range(steps + 3):
        ids.update_inplace(np.array([[token]], np.int64))
        pos.update_inplace(np.array([[context + step]], np.int64))
        seqlens.update_inplace(np.array([context + step], np.int32))
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        token = int(logits.numpy()[0, -1].argmax())
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def attempt(results: dict[str, Any], key: str, fn: Any) -> None:
    try:
        results[key] = round(fn(), 3)
    except Exception as exc:  # a failed configuration is a result too
        results[key] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        traceback.print_exc()
    print(key, results[key], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_decode.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_decode"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--provider", default="cuda")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    shape = TINY if args.tiny else GPT_1B
    results: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                               "shape": shape, "python": sys.version.split()[0]}
    start = time.perf_counter()
    path, manifest = build_fp16(shape, args.work)
    results["build_s"] = round(time.perf_counter() - start, 1)
    plain = session(path, args.provider)
    results["session_providers"] = plain.get_providers()
    device = "cuda" if args.provider == "cuda" else "cpu"
    for rnd in range(args.rounds):
        for batch, context in ((1, 64), (1, 512), (8, 64), (8, 512)):
            attempt(results, f"r{rnd}_engine_b{batch}_ctx{context}_ms",
                    lambda: engine_decode(plain, manifest, batch, context, args.steps))
        attempt(results, f"r{rnd}_fixed_binding_b1_ctx512_ms",
                lambda: fixed_binding_decode(plain, manifest, 512, args.steps, device))
    if args.provider == "cuda":
        try:
            graph = session(path, "cuda", cuda_graph=True)
            for rnd in range(args.rounds):
                attempt(results, f"r{rnd}_cuda_graph_b1_ctx512_ms",
                        lambda: fixed_binding_decode(graph, manifest, 512, args.steps, device))
        except Exception as exc:
            results["cuda_graph"] = f"failed: {type(exc).__name__}: {exc}"
    summary = {}
    for key in {k.split("_", 1)[1] for k in results if k.startswith("r0_")}:
        values = [results[f"r{r}_{key}"] for r in range(args.rounds) if isinstance(results.get(f"r{r}_{key}"), float)]
        if values:
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    results["summary"] = summary
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
