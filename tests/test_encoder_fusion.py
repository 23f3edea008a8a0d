"""Encoder artifacts are traced so that ORT's offline Attention fusion applies (it does not match
graphs traced with SDPA attention, transformers' default)."""

from __future__ import annotations

import pytest
import transformers

from jaonnx.artifact import read_manifest
from jaonnx_export.optimize import optimize_graph


# ALBERT shares one layer's weights across its layers: ORT fuses the first use of them only.
# BERT-layout encoders compute their last layer at the mask rows only (wrappers.bert_layer_at_rows):
# every layer but that one is a standard attention block.
@pytest.mark.parametrize("recipe,fused_layers", [("jmedroberta", -1), ("rinna-roberta", -1), ("ken11-albert", 1)])
def test_encoder_graph_gets_the_attention_fusion(artifacts, twins_dir, tmp_path, recipe, fused_layers):
    artifact = artifacts[recipe]
    config = transformers.AutoConfig.from_pretrained(twins_dir / recipe)
    report = optimize_graph(artifact / "model.onnx", tmp_path / "model.onnx", read_manifest(artifact), config)
    expected = config.num_hidden_layers + fused_layers if fused_layers < 0 else fused_layers
    assert report["fusions"].get("Attention") == expected, report
