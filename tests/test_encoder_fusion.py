"""Encoder artifacts are traced so that ORT's offline Attention fusion applies (it does not match
graphs traced with SDPA attention, transformers' default)."""

from __future__ import annotations

import pytest
import transformers

from jaonnx.artifact import read_manifest
from jaonnx_export.optimize import optimize_graph


# The last layer runs at the mask rows only (wrappers.encoder_plan), which is no standard attention
# block: BERT and RoBERTa fuse every other layer. ALBERT shares one layer's weights across its
# layers and ORT fuses one use of them, the first after layer 0 (whose residual is the embedding
# projection, not a LayerNorm): layer 1, which in the 2-layer twin is the rows-only last layer.
@pytest.mark.parametrize("recipe", ["jmedroberta", "rinna-roberta", "ken11-albert"])
def test_encoder_graph_gets_the_attention_fusion(artifacts, twins_dir, tmp_path, recipe):
    artifact = artifacts[recipe]
    config = transformers.AutoConfig.from_pretrained(twins_dir / recipe)
    report = optimize_graph(artifact / "model.onnx", tmp_path / "model.onnx", read_manifest(artifact), config)
    layers = config.num_hidden_layers
    expected = (1 if layers >= 3 else 0) if recipe == "ken11-albert" else layers - 1
    assert report["fusions"].get("Attention", 0) == expected, report
