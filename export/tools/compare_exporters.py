"""Legacy TorchScript vs dynamo (torch.export) ONNX exporter on the five twins.

    python export/tools/compare_exporters.py TWINS_DIR

For each twin and exporter: export time, node count, max |logit diff| against PyTorch at a
shape other than the traced one (batch 3, length 11; decoders with a past of 6), and whether
the export failed. The result decides export/EXPORTER.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from jaonnx_export.architectures import ARCHITECTURES
from jaonnx_export.export import _load_model
from jaonnx_export.sources import resolve


def probe_inputs(adapter, config) -> tuple[torch.Tensor, ...]:
    """Inputs of another shape than the example inputs, to test the dynamic axes."""
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)
    if adapter.task == "fill-mask":
        ids = torch.randint(5, vocab, (3, 11), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        return ids, mask, torch.tensor([[1, 4, 9], [2, 0, 0], [5, 6, 10]])
    shape = adapter.decoder_shape(config)
    batch, new, past = 3, 2, 6
    cache = [torch.randn(batch, shape.num_heads, past, shape.head_dim, generator=gen) for _ in range(2 * shape.num_layers)]
    return (torch.randint(5, vocab, (batch, new), generator=gen), torch.ones(batch, past + new, dtype=torch.long),
            torch.arange(past, past + new).expand(batch, new).contiguous(), torch.tensor([new]), *cache)


def dynamic_shapes(adapter, config) -> tuple:
    """dynamo's form of the adapter's dynamic axes: mirrors forward()'s arguments, with the
    decoder's `*past` as one nested tuple; Dim.AUTO lets torch.export relate past + new."""
    from torch.export import Dim

    inputs = adapter.names(config)[0]
    axes = adapter.dynamic_axes(config)
    spec = [{axis: Dim.AUTO for axis in axes[name]} if name in axes else None for name in inputs]
    if adapter.task == "fill-mask":
        return tuple(spec)
    return (*spec[:4], tuple(spec[4:]))


def run(twin: Path, dynamo: bool) -> dict:
    source = resolve(str(twin))
    model = _load_model(source)
    adapter = ARCHITECTURES[source.recipe.architecture]
    wrapper = adapter.wrap(model, source.recipe)
    config = model.config
    inputs, outputs = adapter.names(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shapes = {"dynamic_shapes": dynamic_shapes(adapter, config)} if dynamo else {
                    "dynamic_axes": adapter.dynamic_axes(config)}
                torch.onnx.export(wrapper, adapter.example_inputs(config), str(path), input_names=inputs,
                                  output_names=outputs, opset_version=18, dynamo=dynamo, **shapes)
        except Exception as exc:
            return {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"}
        seconds = time.perf_counter() - started
        graph = onnx.load(str(path), load_external_data=False)
        nodes = len(graph.graph.node)
        probe = probe_inputs(adapter, config)
        with torch.no_grad():
            expected = wrapper(*probe)
        expected = expected[0] if isinstance(expected, tuple) else expected
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {name: t.numpy() for name, t in zip(inputs, probe)}
        try:
            got = session.run(["logits"], feed)[0]
            diff = float(np.abs(got - expected.numpy()).max())
        except Exception as exc:
            diff = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"export_s": round(seconds, 2), "nodes": nodes, "max_abs_diff_other_shape": diff, "bytes": size}


def main() -> None:
    twins = Path(sys.argv[1])
    only = sys.argv[2:]
    results = {}
    for twin in sorted(p for p in twins.iterdir() if (p / "config.json").is_file() and (not only or p.name in only)):
        results[twin.name] = {"legacy": run(twin, False), "dynamo": run(twin, True)}
        print(twin.name, json.dumps(results[twin.name]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
