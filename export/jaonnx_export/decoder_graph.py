"""The GPT-2 decoder graph for an in-place KV cache, built node by node from the weights.

Each layer's attention is `com.microsoft.GroupQueryAttention` (kv_num_heads = num_heads),
which writes the new keys/values into a preallocated [batch, heads, capacity, head_dim]
buffer at each row's own length (`seqlens_k`) instead of concatenating a new cache every
step: when the caller binds `present.*` to the memory of `past_key_values.*`, a decode step
copies nothing but the new token's k/v. Rows of different lengths need no left padding, so
positions are each row's own token count, exactly what transformers gives a prompt alone.

Built directly (not traced) so the graph is independent of the torch.onnx exporter and the
tied LM head reads the embedding table itself (a Gemm with transB=1): the weights are
stored once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import DecoderShape
from jaonnx.errors import JaonnxError

OPSET = 18
MS_DOMAIN = "com.microsoft"
# transformers' activation name -> (op, domain); gelu_new is the tanh approximation.
ACTIVATIONS = {
    "gelu_new": ("FastGelu", MS_DOMAIN),
    "gelu_pytorch_tanh": ("FastGelu", MS_DOMAIN),
    "gelu_fast": ("FastGelu", MS_DOMAIN),
    "gelu": ("Gelu", MS_DOMAIN),
    "relu": ("Relu", ""),
}


def names(num_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """Graph input and output names -> element type, in graph order."""
    inputs = {"input_ids": "int64", "position_ids": "int64", "seqlens_k": "int32",
              "total_sequence_length": "int32", "logits_to_keep": "int64"}
    outputs = {"logits": "float32"}
    for i in range(num_layers):
        inputs |= {f"past_key_values.{i}.key": "float32", f"past_key_values.{i}.value": "float32"}
        outputs |= {f"present.{i}.key": "float32", f"present.{i}.value": "float32"}
    return inputs, outputs


def supported(config: Any) -> str | None:
    """Why this GPT-2 config cannot use the static layout, or None when it can."""
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "scale_attn_by_inverse_layer_idx is not supported by the static KV layout"
    if not getattr(config, "scale_attn_weights", True):
        return "scale_attn_weights=False is not supported by the static KV layout"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention is not supported by the static KV layout"
    head_dim = int(config.n_embd) // int(config.n_head)
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8, which GroupQueryAttention needs"
    if config.activation_function not in ACTIVATIONS:
        return f"activation {config.activation_function!r} is not supported by the static KV layout"
    return None


def decoder_shape(config: Any) -> DecoderShape:
    return DecoderShape(num_layers=int(config.n_layer), num_heads=int(config.n_head),
                        head_dim=int(config.n_embd) // int(config.n_head), kv_layout="static")


def build(model: Any, path: Path) -> None:
    """Write the static-cache decoder graph of a transformers GPT2LMHeadModel to `path`
    (weights in `path`.data next to it; the caller re-saves as it likes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    reason = supported(config)
    if reason:
        raise JaonnxError(f"{reason}: export with --kv-cache concat")
    weights = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    shape = decoder_shape(config)
    hidden, heads, eps = int(config.n_embd), shape.num_heads, float(config.layer_norm_epsilon)
    act_op, act_domain = ACTIVATIONS[config.activation_function]

    nodes: list[Any] = []
    inits: list[Any] = []
    data_name = path.name + ".data"
    data = open(path.parent / data_name, "wb")  # closed once the graph is written
    offset = 0

    def init(name: str, array: np.ndarray) -> str:
        """Small tensors inline; weights streamed straight into the data file (one page-aligned
        tensor at a time), so building never holds a second copy of the model's weights."""
        nonlocal offset
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            inits.append(numpy_helper.from_array(array, name))
            return name
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        padding = -offset % 4096
        data.write(b"\0" * padding)
        offset += padding
        data.write(array.data)
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        offset += array.nbytes
        inits.append(tensor)
        return name

    def node(op: str, ins: list[str], out: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, domain=domain, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        # GPT-2 Conv1D weights are already [in, out]: a plain MatMul + bias Add, which the
        # int8 quantizer folds into one DynamicQuantizeMatMul.
        y = node("MatMul", [x, init(f"{prefix}.weight", weights[f"{prefix}.weight"])], f"{out}_mm")
        return node("Add", [y, init(f"{prefix}.bias", weights[f"{prefix}.bias"])], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, init(f"{prefix}.weight", weights[f"{prefix}.weight"]),
                                           init(f"{prefix}.bias", weights[f"{prefix}.bias"])],
                    out, axis=-1, epsilon=eps)

    wte = init("transformer.wte.weight", weights["transformer.wte.weight"])
    wpe = init("transformer.wpe.weight", weights["transformer.wpe.weight"])
    h = node("Add", [node("Gather", [wte, "input_ids"], "tok_emb"), node("Gather", [wpe, "position_ids"], "pos_emb")],
             "h0")
    scale = 1.0 / math.sqrt(shape.head_dim)
    for i in range(shape.num_layers):
        p = f"transformer.h.{i}"
        x = layer_norm(h, f"{p}.ln_1", f"l{i}_ln1")
        qkv = linear(x, f"{p}.attn.c_attn", f"l{i}_qkv")
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"],
            [f"l{i}_attn", f"present.{i}.key", f"present.{i}.value"],
            name=f"l{i}_gqa", domain=MS_DOMAIN, num_heads=heads, kv_num_heads=heads, scale=scale, do_rotary=0,
        ))
        h = node("Add", [h, linear(f"l{i}_attn", f"{p}.attn.c_proj", f"l{i}_attn_out")], f"l{i}_h_attn")
        x = layer_norm(h, f"{p}.ln_2", f"l{i}_ln2")
        m = node(act_op, [linear(x, f"{p}.mlp.c_fc", f"l{i}_fc")], f"l{i}_act", domain=act_domain)
        h = node("Add", [h, linear(m, f"{p}.mlp.c_proj", f"l{i}_mlp_out")], f"l{i}_h")
    h = layer_norm(h, "transformer.ln_f", "h_final")

    # Only the last `logits_to_keep` positions go through the vocabulary projection.
    start = node("Neg", ["logits_to_keep"], "keep_start")
    end = init("keep_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    axis = init("keep_axis", np.array([1], dtype=np.int64))
    kept = node("Slice", [h, start, end, axis], "h_kept")
    flat = node("Reshape", [kept, init("flat_shape", np.array([-1, hidden], dtype=np.int64))], "h_flat")
    if tied:
        head = node("Gemm", [flat, wte], "logits_flat", transB=1)
    else:
        head = node("MatMul", [flat, init("lm_head.weight", weights["lm_head.weight"].T)], "logits_flat")
    lead = node("Shape", [kept], "kept_lead", start=0, end=2)
    vocab = init("vocab", np.array([weights["transformer.wte.weight"].shape[0]], dtype=np.int64))
    out_shape = node("Concat", [lead, vocab], "logits_shape", axis=0)
    node("Reshape", [head, out_shape], "logits")

    dims = {"input_ids": ["batch", "sequence"], "position_ids": ["batch", "sequence"], "seqlens_k": ["batch"],
            "total_sequence_length": [], "logits_to_keep": [1]}
    types = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}
    cache = ["batch", heads, "capacity", shape.head_dim]
    ins, outs = names(shape.num_layers)
    graph_inputs = [helper.make_tensor_value_info(n, types[t], dims.get(n, cache)) for n, t in ins.items()]
    out_dims = {"logits": ["batch", "kept_sequence", int(config.vocab_size)]}
    graph_outputs = [helper.make_tensor_value_info(n, types[t], out_dims.get(n, ["batch", heads, "present_capacity",
                                                                               shape.head_dim]))
                     for n, t in outs.items()]
    graph = helper.make_graph(nodes, "jaonnx_static_decoder", graph_inputs, graph_outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid(MS_DOMAIN, 1)],
                                   producer_name="jaonnx")
    onnx_model.ir_version = 9
    data.close()
    onnx.save_model(onnx_model, str(path))
