"""The GPT-2 decoder graph for an in-place KV cache, built node by node from the weights.

Each layer's attention is `com.microsoft.GroupQueryAttention` (kv_num_heads = num_heads),
which writes the new keys/values into a preallocated [batch, heads, capacity, head_dim]
buffer at each row's own length (`seqlens_k`) instead of concatenating a new cache every
step: when the caller binds `present.*` to the memory of `past_key_values.*`, a decode step
copies nothing but the new token's k/v. Rows of different lengths need no left padding, so
positions are each row's own token count, exactly what transformers gives a prompt alone.

Built directly (not traced) so the graph is independent of the torch.onnx exporter, with
ORT's fused ops in it for CUDA (SkipLayerNormalization, FastGelu with its bias: fewer kernels,
LayerNorm kept fp16 by the fp16 converter), plain Add + LayerNormalization for the CPU, where
ORT 1.32's SkipLayerNormalization kernel is slower (~8x at 128 rows; CPU time per decode step
-5..-11% and per 128-token prefill -7..-17% without it: benchmarks/results/
fused_vs_plain_prefill_1thread.json; architectures.py chooses). The tied LM head reads the embedding table itself, stored once as
[hidden, vocab]. Nothing in the graph computes a shape or copies a value to the host, so ORT
can capture it as one CUDA graph (checked by jaonnx_export.cuda_placement).

`even_rows` (CPU, int4 blocks of 64 and more) carries the residual stream as [rows, hidden]
padded with one zero row when batch x sequence is odd, so every weight product sees an even
row count. ORT 1.32's MatMulNBits computes rows in pairs, each row independent of its
partner, but a lone row (M == 1, or the last of an odd M) with another kernel whose sums
differ in the last bits for blocks >= 64: without the padding a request's tokens would depend
on its batch. Attention sees the real rows only (a Slice before it, a Pad after it).
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
# metadata_props key: the graph pads its rows to an even count (read by quantize.quantize_int4)
EVEN_ROWS_KEY = "jaonnx.even_rows"
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


def has_even_rows(path: Path) -> bool:
    """Whether the graph at `path` was built with `even_rows` (its metadata says so)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(p.key == EVEN_ROWS_KEY and p.value == "1" for p in model.metadata_props)


class EvenRows:
    """The nodes of `even_rows` (module docstring): [batch, sequence, width] <-> [rows, width],
    the latter with one zero row added when batch x sequence is odd. `node(op, inputs, out,
    **attrs)` and `init(name, array)` are the graph builder's own."""

    def __init__(self, node: Any, init: Any, hidden: int) -> None:
        self.node = node
        i64 = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
        self.by_hidden = init("rows_shape", i64([-1, hidden]))
        self.zero = init("rows_zero", i64([0]))
        self.count = node("ReduceProd", [node("Shape", ["input_ids"], "batch_seq")], "rows_real", keepdims=1)
        odd = node("Mod", [self.count, init("rows_two", i64([2]))], "rows_odd")
        self.pads = node("Concat", [self.zero, self.zero, odd, self.zero], "rows_pads", axis=0)  # [0, 0, odd, 0]
        self.batch_seq_any = node("Concat", ["batch_seq", init("rows_any", i64([-1]))], "batch_seq_any", axis=0)

    def pad(self, x: str) -> str:
        """[batch, sequence, hidden] -> [even rows, hidden]."""
        return self.node("Pad", [self.node("Reshape", [x, self.by_hidden], f"{x}_rows"), self.pads], f"{x}_even")

    def real(self, x: str, stem: str) -> str:
        """[even rows, width] -> [batch, sequence, width]: the padding row dropped."""
        kept = self.node("Slice", [x, self.zero, self.count, self.zero], f"{stem}_real")
        return self.node("Reshape", [kept, self.batch_seq_any], f"{stem}_bsh")


def build(model: Any, path: Path, fused: bool = True, even_rows: bool = False) -> None:
    """Write the static-cache decoder graph of a transformers GPT2LMHeadModel to `path`
    (weights in `path`.data next to it; the caller re-saves as it likes).

    `fused` (the default) builds ORT's fused ops directly: each residual Add + LayerNorm (and
    the projection's bias) is one SkipLayerNormalization, each MLP bias + activation one
    FastGelu/BiasGelu. Fewer nodes is fewer kernel launches on CUDA, and the fp16 converter
    leaves SkipLayerNormalization in fp16 (it accumulates its mean and variance in fp32), so
    the fp16 graph has no Cast pair around any LayerNorm. `fused=False` builds the plain ONNX
    ops (what the fused graph is measured against). `even_rows` pads the rows of every weight
    product to an even count (module docstring; plain graphs only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    reason = supported(config)
    if even_rows and fused:
        raise ValueError("even_rows is for the plain (CPU) graph")
    if reason:
        raise JaonnxError(f"{reason}: export with --kv-cache concat")
    weights = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    shape = decoder_shape(config)
    heads, eps = shape.num_heads, float(config.layer_norm_epsilon)
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

    def weight(prefix: str) -> str:
        return init(f"{prefix}.weight", weights[f"{prefix}.weight"])

    def bias(prefix: str) -> str:
        return init(f"{prefix}.bias", weights[f"{prefix}.bias"])

    def linear(x: str, prefix: str, out: str) -> str:
        # GPT-2 Conv1D weights are already [in, out]: a plain MatMul + bias Add, which the
        # quantizers rewrite (linear_ops.py: per-row int8, int4 blocks).
        return node("Add", [node("MatMul", [x, weight(prefix)], f"{out}_mm"), bias(prefix)], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, weight(prefix), bias(prefix)], out, axis=-1, epsilon=eps)

    def skip_norm(x: str, skip: str, norm: str, add_bias: str, out: str) -> tuple[str, str]:
        """(LayerNorm(x + skip + add_bias), x + skip + add_bias) as one SkipLayerNormalization."""
        ins = [x, skip, weight(norm), bias(norm)] + ([bias(add_bias)] if add_bias else [])
        total = f"{out}_sum"
        nodes.append(helper.make_node("SkipLayerNormalization", ins, [out, "", "", total], name=out,
                                      domain=MS_DOMAIN, epsilon=eps))
        return out, total

    # The embedding table is stored once. A tied LM head reads it as [hidden, vocab] (a MatMul
    # on the 3-D hidden states, so the logits come out [batch, kept, vocab] with no reshape, whose
    # shape would be computed on the CPU); the token lookup then gathers columns of that table.
    wte_array = weights["transformer.wte.weight"]
    if tied:
        table = init("transformer.wte.weight.T", wte_array.T)
        columns = node("Gather", [table, "input_ids"], "tok_emb_t", axis=1)  # [hidden, batch, seq]
        tok = node("Transpose", [columns], "tok_emb", perm=[1, 2, 0])
        head_weight = table
    else:
        tok = node("Gather", [init("transformer.wte.weight", wte_array), "input_ids"], "tok_emb")
        head_weight = init("lm_head.weight.T", weights["lm_head.weight"].T)
    pos = node("Gather", [init("transformer.wpe.weight", weights["transformer.wpe.weight"]), "position_ids"], "pos_emb")
    scale = 1.0 / math.sqrt(shape.head_dim)
    last = shape.num_layers - 1

    rows = EvenRows(node, init, int(config.n_embd)) if even_rows else None

    def attention(x: str, i: int) -> str:
        p = f"transformer.h.{i}"
        qkv = linear(x, f"{p}.attn.c_attn", f"l{i}_qkv")
        if rows:
            qkv = rows.real(qkv, f"l{i}_qkv")
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"],
            [f"l{i}_attn", f"present.{i}.key", f"present.{i}.value"],
            name=f"l{i}_gqa", domain=MS_DOMAIN, num_heads=heads, kv_num_heads=heads, scale=scale, do_rotary=0,
        ))
        return rows.pad(f"l{i}_attn") if rows else f"l{i}_attn"

    if fused:
        x, h = skip_norm(tok, pos, "transformer.h.0.ln_1", "", "l0_ln1")
        for i in range(shape.num_layers):
            p = f"transformer.h.{i}"
            attn = node("MatMul", [attention(x, i), weight(f"{p}.attn.c_proj")], f"l{i}_attn_out_mm")
            x, h = skip_norm(attn, h, f"{p}.ln_2", f"{p}.attn.c_proj", f"l{i}_ln2")
            fc = node("MatMul", [x, weight(f"{p}.mlp.c_fc")], f"l{i}_fc_mm")
            if act_op == "Relu":
                m = node("Relu", [node("Add", [fc, bias(f"{p}.mlp.c_fc")], f"l{i}_fc")], f"l{i}_act")
            else:  # FastGelu takes the bias itself; exact gelu's biased form is BiasGelu
                op = "FastGelu" if act_op == "FastGelu" else "BiasGelu"
                m = node(op, [fc, bias(f"{p}.mlp.c_fc")], f"l{i}_act", domain=MS_DOMAIN)
            mlp = node("MatMul", [m, weight(f"{p}.mlp.c_proj")], f"l{i}_mlp_out_mm")
            following = f"transformer.h.{i + 1}.ln_1" if i < last else "transformer.ln_f"
            x, h = skip_norm(mlp, h, following, f"{p}.mlp.c_proj", f"l{i + 1}_ln1" if i < last else "h_final")
        hidden = x
    else:
        h = node("Add", [tok, pos], "h0")
        if rows:
            h = rows.pad(h)
        for i in range(shape.num_layers):
            p = f"transformer.h.{i}"
            attn = attention(layer_norm(h, f"{p}.ln_1", f"l{i}_ln1"), i)
            h = node("Add", [h, linear(attn, f"{p}.attn.c_proj", f"l{i}_attn_out")], f"l{i}_h_attn")
            x = layer_norm(h, f"{p}.ln_2", f"l{i}_ln2")
            m = node(act_op, [linear(x, f"{p}.mlp.c_fc", f"l{i}_fc")], f"l{i}_act", domain=act_domain)
            h = node("Add", [h, linear(m, f"{p}.mlp.c_proj", f"l{i}_mlp_out")], f"l{i}_h")
        if rows:  # drop the padding row before the final norm and the head
            h = rows.real(h, "h")
        hidden = layer_norm(h, "transformer.ln_f", "h_final")

    # Only the last `logits_to_keep` positions go through the vocabulary projection. The count
    # feeds Slice's `ends` directly (reverse, take the first `keep`, reverse back): a value
    # computed from it (-keep as `starts`) would be made on the GPU and copied to the host each
    # run, and a graph with such a copy cannot be captured as a CUDA graph.
    first = init("keep_first", np.array([-1], dtype=np.int64))
    before_all = init("keep_before_all", np.array([np.iinfo(np.int64).min], dtype=np.int64))
    zero = init("keep_zero", np.array([0], dtype=np.int64))
    axis = init("keep_axis", np.array([1], dtype=np.int64))
    back = init("keep_step", np.array([-1], dtype=np.int64))
    reversed_hidden = node("Slice", [hidden, first, before_all, axis, back], "h_reversed")
    kept_reversed = node("Slice", [reversed_hidden, zero, "logits_to_keep", axis], "h_kept_reversed")
    kept = node("Slice", [kept_reversed, first, before_all, axis, back], "h_kept")
    node("MatMul", [kept, head_weight], "logits")

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
    if rows:
        helper.set_model_props(onnx_model, {EVEN_ROWS_KEY: "1"})
    data.close()
    onnx.save_model(onnx_model, str(path))
