"""Encoder artifacts are traced so that ORT's offline Attention fusion applies (it does not match
graphs traced with SDPA attention, transformers' default)."""

from __future__ import annotations

import pytest
import transformers

from jaonnx.artifact import read_manifest
from jaonnx_export.optimize import optimize_graph


# ALBERT shares one layer's weights across its layers: ORT fuses the first use of them only.
@pytest.mark.parametrize("recipe,fused_layers", [("jmedroberta", None), ("rinna-roberta", None), ("ken11-albert", 1)])
def test_encoder_graph_gets_the_attention_fusion(artifacts, twins_dir, tmp_path, recipe, fused_layers):
    artifact = artifacts[recipe]
    config = transformers.AutoConfig.from_pretrained(twins_dir / recipe)
    report = optimize_graph(artifact / "model.onnx", tmp_path / "model.onnx", read_manifest(artifact), config)
    assert report["fusions"].get("Attention") == (fused_layers or config.num_hidden_layers), report
