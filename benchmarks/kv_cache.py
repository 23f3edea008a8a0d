"""Concat vs static KV cache: decode ms/token at two contexts, fp32 and int8, side by side.

GPT-2 small shape (12 layers, 768 wide, vocab 32000), random weights. Each graph is driven the
way the runtime drives it: the concat graph through DecoderSession (IO binding, present.* fed
back as OrtValues), the static graph through StaticBatchDecoder (one buffer, written in place).
Repeats are interleaved (every configuration once per round) so a slow minute hits all of them.

    PYTHONPATH=runtime:export python benchmarks/kv_cache.py [--layers 12] [--rounds 3] [--json out.json]

`--save DIR` keeps the four graphs (weights in external files); `--load DIR` times saved ones
without torch, e.g. on another machine after `--strip`ping the weights there and back
(`--random-weights` refills them: decode speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _models(work: Path, layers: int, hidden: int, heads: int, vocab: int) -> dict[str, tuple[Path, Any]]:
    """(path, manifest) of the four graphs: {concat,static} x {fp32,int8}."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaonnx.artifact import Manifest
    from jaonnx_export import decoder_graph, precision
    from jaonnx_export.architectures import ARCHITECTURES

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=1024)
    model = GPT2LMHeadModel(config).eval()
    adapter = ARCHITECTURES["GPT2LMHeadModel"]
    found: dict[str, tuple[Path, Any]] = {}

    def manifest(inputs: dict[str, str], outputs: dict[str, str], shape: Any) -> Any:
        return Manifest(recipe="gpt2-small-ja", task="text-generation", model_file="model.onnx", tokenizer_file="",
                        special_ids={}, vocab_size=vocab, max_positions=1024, inputs=inputs, outputs=outputs,
                        decoder=shape)

    static = work / "static-fp32" / "model.onnx"
    static.parent.mkdir()
    decoder_graph.build(model, static)
    ins, outs = decoder_graph.names(layers)
    static_manifest = manifest(ins, outs, decoder_graph.decoder_shape(config))
    found["static-fp32"] = (static, static_manifest)

    def trace(name: str) -> Path:
        path = work / name / "model.onnx"
        path.parent.mkdir()
        inputs, outputs = adapter.names(config)
        with torch.no_grad():
            torch.onnx.export(adapter.wrap(model, None), adapter.example_inputs(config), str(path),
                              input_names=inputs, output_names=outputs, dynamic_axes=adapter.dynamic_axes(config),
                              opset_version=18, dynamo=False)
        return path

    inputs, outputs = adapter.names(config)
    concat_manifest = manifest({n: ("float32" if n.startswith("past") else "int64") for n in inputs},
                               {n: "float32" for n in outputs}, adapter.decoder_shape(config))
    found["concat-fp32"] = (trace("concat-fp32"), concat_manifest)
    # What export does before int8 for the concat graph, so its head is quantized too.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    untied = trace("concat-untied")
    for name, src, man in (("concat-int8", untied, concat_manifest), ("static-int8", static, static_manifest)):
        dst = work / name / "model.onnx"
        dst.parent.mkdir()
        precision.quantize_int8(src, dst, None)
        found[name] = (dst, man)
    return found


class Concat:
    def __init__(self, session: Any, manifest: Any) -> None:
        from jaonnx.generation.decoder import DecoderSession

        self.decoder = DecoderSession(session, manifest)

    def prefill(self, ids: list[int]) -> int:
        n = len(ids)
        self.n = n
        self.decoder.reset(1)
        logits = self.decoder.forward(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], keep=1)
        return int(logits[0, -1].argmax())

    def step(self, token: int) -> int:
        self.n += 1
        logits = self.decoder.forward(np.array([[token]]), np.ones((1, self.n), np.int64),
                                      np.array([[self.n - 1]]), keep=1)
        return int(logits[0, -1].argmax())


class Static:
    def __init__(self, session: Any, manifest: Any) -> None:
        from jaonnx.generation.static_cache import StaticBatchDecoder

        self.session, self.manifest = session, manifest

    def prefill(self, ids: list[int]) -> int:
        from jaonnx.generation.static_cache import StaticBatchDecoder

        self.decoder = StaticBatchDecoder(self.session, self.manifest)
        return int(self.decoder.add([ids], reserve=len(ids) + 64)[0].argmax())

    def step(self, token: int) -> int:
        return int(self.decoder.step(np.array([[token]]))[0, -1].argmax())


def _save(graphs: dict[str, tuple[Path, Any]], directory: Path) -> None:
    import onnx

    for name, (path, manifest) in graphs.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(path))
        onnx.save_model(model, str(directory / name / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        (directory / name / "manifest.json").write_text(manifest.to_json())


def _random_weights(directory: Path) -> None:
    """Write random values into every external tensor (weights only; shapes stay inline)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    rng = np.random.default_rng(0)
    kinds = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT8: np.int8}
    for path in sorted(directory.glob("*/model.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        with open(path.parent / "model.onnx.data", "wb") as data:
            for tensor in model.graph.initializer:
                if not uses_external_data(tensor):
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                dtype = kinds[tensor.data_type]
                count = int(np.prod(tensor.dims))
                values = (rng.integers(-60, 60, count) if dtype == np.int8 else 0.02 * rng.standard_normal(count))
                if tensor.name.endswith("_scale"):
                    values = np.full(count, 0.001)
                data.seek(int(info.get("offset", 0)))
                data.write(values.astype(dtype).tobytes())


def _load(directory: Path) -> dict[str, tuple[Path, Any]]:
    from jaonnx.artifact import Manifest

    return {p.name: (p / "model.onnx", Manifest.from_dict(json.loads((p / "manifest.json").read_text())))
            for p in sorted(directory.iterdir()) if (p / "manifest.json").is_file()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="intra-op threads (0: the default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time (use with --threads 1): steadier on a shared machine")
    parser.add_argument("--save", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--random-weights", action="store_true", help="refill the --load graphs' weights")
    args = parser.parse_args()

    from jaonnx.session import create_session

    with tempfile.TemporaryDirectory() as tmp:
        if args.load:
            if args.random_weights:
                _random_weights(args.load)
            graphs = _load(args.load)
        else:
            graphs = _models(Path(tmp), args.layers, args.hidden, args.heads, args.vocab)
        if args.save:
            _save(graphs, args.save)
            return
        runners = {}
        for threads in args.threads:
            for graph, (path, manifest) in graphs.items():
                session = create_session(path, providers="cpu", intra_op_threads=threads or None)
                name = graph + (f"/t{threads}" if threads else "")
                runners[name] = (Concat if graph.startswith("concat") else Static)(session, manifest)
        rng = np.random.default_rng(0)
        results: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for context in args.contexts:
                prompt = rng.integers(5, min(m.vocab_size for _, m in graphs.values()), context).tolist()
                for name, runner in runners.items():
                    token = runner.prefill(prompt)
                    token = runner.step(token)  # warm-up
                    times = []
                    clock = time.process_time if args.cpu_time else time.perf_counter
                    for _ in range(args.steps):
                        start = clock()
                        token = runner.step(token)
                        times.append((clock() - start) * 1000)
                    results.setdefault(f"{name}@{context}", []).append(float(np.median(times)))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)
    table = {k: {"median_ms": float(np.median(v)), "min_ms": min(v), "max_ms": max(v)} for k, v in results.items()}
    print(f"{'graph':<18}" + "".join(f"{'@' + str(c):>18}" for c in args.contexts) + "   ratio")
    for name in runners:
        cells = [table[f"{name}@{c}"] for c in args.contexts]
        line = "".join(f"{c['median_ms']:8.2f} [{c['min_ms']:.1f}-{c['max_ms']:.1f}]" for c in cells)
        print(f"{name:<18}{line}   {cells[-1]['median_ms'] / cells[0]['median_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ms_per_token": table},
                                        indent=2))


if __name__ == "__main__":
    main()
