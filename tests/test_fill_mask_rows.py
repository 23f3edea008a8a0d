"""The masked-LM wrapper computes the last layer (BERT, RoBERTa, ALBERT) at the mask rows only;
its logits there must equal transformers' full forward (padding, two masks, every position)."""

from __future__ import annotations

import pytest
import torch
import transformers

from jaonnx.recipes import get_recipe
from jaonnx_export.architectures import adapter_for
from jaonnx_export.wrappers import encoder_plan

MLM = ["jmedroberta", "rinna-roberta", "ken11-albert"]


def _model(twins_dir, recipe):
    return transformers.AutoModelForMaskedLM.from_pretrained(twins_dir / recipe, attn_implementation="eager").eval()


@pytest.mark.parametrize("recipe", MLM)
def test_rows_only_last_layer_equals_the_full_forward(twins_dir, recipe):
    model = _model(twins_dir, recipe)
    r = get_recipe(recipe)
    wrapper = adapter_for(model.config.architectures[0]).wrap(model, r)
    assert wrapper.plan is not None and len(wrapper.plan.layers) == model.config.num_hidden_layers
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    mask[2, 3:] = 0
    every = torch.arange(11).expand(3, -1)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + r.position_start
        extra = {"token_type_ids": torch.zeros_like(ids)} if r.token_type_ids else {}
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits
        for rows in (torch.tensor([[1, 4], [6, 0], [2, 2]]), every):
            ours = wrapper(ids, mask, rows)
            expected = torch.gather(full, 1, rows.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
            valid = torch.gather(mask, 1, rows).bool()  # padded rows' logits are never read
            torch.testing.assert_close(ours[valid], expected[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe,layer", [("jmedroberta", "encoder.layer.0.attention.self"),
                                          ("ken11-albert", "encoder.albert_layer_groups.0.albert_layers.0.attention")])
def test_an_encoder_without_a_known_layout_runs_whole(twins_dir, recipe, layer):
    model = _model(twins_dir, recipe)
    assert encoder_plan(model.base_model) is not None
    del model.base_model.get_submodule(layer).query
    assert encoder_plan(model.base_model) is None


@pytest.mark.parametrize("recipe", MLM)
def test_exported_graph_runs_the_last_feed_forward_at_the_mask_rows(artifacts, twins_dir, recipe):
    """In the artifact, the feed-forward products ([hidden, intermediate] weights) of every
    layer but the last run over the sequence; the last one over the masks only."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    config = transformers.AutoConfig.from_pretrained(twins_dir / recipe)
    model = SymbolicShapeInference.infer_shapes(onnx.load(artifacts[recipe] / "model.onnx"), auto_merge=True)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # shared weights (ALBERT's) are read through Identity nodes
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in model.graph.value_info}
    masks = dims(next(i for i in model.graph.input if i.name == "mask_positions"))[1]
    rows = [shapes[n.output[0]][1] for n in model.graph.node
            if n.op_type == "MatMul" and weights.get(n.input[1]) == [config.hidden_size, config.intermediate_size]]
    sequence = dims(model.graph.input[0])[1]
    # one product per layer (ALBERT's shared weights too), over the sequence; the last over the masks
    assert rows == [sequence] * (config.num_hidden_layers - 1) + [masks], rows
