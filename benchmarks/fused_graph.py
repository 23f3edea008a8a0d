"""Fused vs plain static decoder graph on the CPU (issue 19 item 1): does building
SkipLayerNormalization and bias+FastGelu into the graph pay for fp32, int8 and int4?

Random weights at a mid-size GPT-2 shape (built without torch by gpu_decode.random_gpt2), the
exporter's graph builder with `fused=True` and `fused=False`, the exporter's int8/int4
quantizers; each decode step is timed as CPU time at one intra-op thread (robust on a shared
machine), the variants interleaved step by step in one process, median over steps.

    PYTHONPATH=runtime:export python benchmarks/fused_graph.py [--layers 6 --hidden 768] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from gpu_decode import _io_dtypes, random_gpt2  # noqa: E402


def build(shape: dict[str, int], work: Path) -> dict[str, Path]:
    from jaonnx_export import decoder_graph
    from jaonnx_export.quantize import quantize_int4, quantize_int8

    paths: dict[str, Path] = {}
    model = random_gpt2(shape)
    for fused in (True, False):
        tag = "fused" if fused else "plain"
        fp32 = work / f"{tag}-fp32" / "model.onnx"
        fp32.parent.mkdir(parents=True, exist_ok=True)
        decoder_graph.build(model, fp32, fused=fused)
        paths[f"{tag}-fp32"] = fp32
        for name, quantize in (("int8", lambda s, d: quantize_int8(s, d, "model.onnx.data")),
                               ("int4", lambda s, d: quantize_int4(s, d, "model.onnx.data", shape["vocab_size"]))):
            target = work / f"{tag}-{name}" / "model.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            quantize(fp32, target)
            paths[f"{tag}-{name}"] = target
    return paths


def decoder(path: Path, shape: dict[str, int]) -> Any:
    from types import SimpleNamespace

    from jaonnx.artifact import Manifest
    from jaonnx.generation.static_cache import StaticBatchDecoder
    from jaonnx.session import create_session
    from jaonnx_export import decoder_graph

    inputs, outputs = _io_dtypes(path)
    manifest = Manifest(recipe="gpt2-small-ja", task="text-generation", model_file="model.onnx",
                        tokenizer_file="spiece.model", special_ids={}, vocab_size=shape["vocab_size"],
                        max_positions=shape["n_positions"], inputs=inputs, outputs=outputs,
                        decoder=decoder_graph.decoder_shape(SimpleNamespace(**shape)))
    return StaticBatchDecoder(create_session(path, "cpu", intra_op_threads=1, cache=False), manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fused_graph"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shape = dict(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab, n_positions=1024)
    paths = build(shape, args.work)
    results: dict[str, Any] = {"shape": shape, "method": "CPU time per decode step, 1 intra-op thread, "
                               "variants interleaved step by step, median", "ms": {}}
    prompt = [5 + i % (args.vocab - 10) for i in range(args.context)]
    for batch in (int(b) for b in args.batches.split(",")):
        decoders = {name: decoder(path, shape) for name, path in paths.items()}
        tokens = {}
        for name, dec in decoders.items():
            tokens[name] = dec.add([prompt] * batch, reserve=args.context + args.steps + 8).argmax(-1)
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for step in range(args.steps + 3):
            for name, dec in decoders.items():
                start = time.process_time()
                logits = dec.step(tokens[name][:, None])
                if step >= 3:
                    times[name].append((time.process_time() - start) * 1e3)
                tokens[name] = logits[:, -1].argmax(-1)
        for name, values in times.items():
            results["ms"][f"{name}-b{batch}"] = round(statistics.median(values), 3)
        for precision in ("fp32", "int8", "int4"):
            fused, plain = results["ms"][f"fused-{precision}-b{batch}"], results["ms"][f"plain-{precision}-b{batch}"]
            results.setdefault("fused_over_plain", {})[f"{precision}-b{batch}"] = round(fused / plain, 3)
        del decoders
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
