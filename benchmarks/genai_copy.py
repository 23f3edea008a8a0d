"""A copy of a jaonnx decoder artifact that onnxruntime-genai can run, for its peer column until
artifacts carry their own genai_config.json (issue 10 item 8): genai cannot feed
`logits_to_keep`, so the copy freezes it to "every position" (a count larger than any sequence) and adds the config.

`python -m benchmarks.genai_copy ART OUT` (run with any python that has `onnx`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def make_copy(artifact: Path, out: Path) -> Path:
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    if (out / "genai_config.json").is_file():
        return out
    manifest = json.loads((artifact / "jaonnx.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = onnx.load(str(artifact / manifest["model_file"]))  # external data too
    graph = model.graph
    keep = [i for i in graph.input if i.name == "logits_to_keep"]
    if keep:
        graph.input.remove(keep[0])
        graph.initializer.append(numpy_helper.from_array(np.array([1 << 30], dtype=np.int64), "logits_to_keep"))
    _mask_to_lengths(graph)
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    d, special = manifest["decoder"], manifest["special_ids"]
    config = {
        "model": {
            "type": "llama", "vocab_size": manifest["vocab_size"], "context_length": manifest["max_positions"],
            "bos_token_id": special.get("bos", 0), "eos_token_id": special.get("eos", 0),
            "pad_token_id": special.get("pad", 0),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": d["head_dim"], "hidden_size": d["head_dim"] * d["num_heads"],
                "num_attention_heads": d["num_heads"], "num_key_value_heads": d["num_heads"],
                "num_hidden_layers": d["num_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": manifest["max_positions"], "min_length": 0,
                   "num_return_sequences": 1, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                   "repetition_penalty": 1.0, "past_present_share_buffer": False, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _mask_to_lengths(graph: "onnx.GraphProto") -> None:
    """A static-KV artifact takes GroupQueryAttention's `seqlens_k` and `total_sequence_length`
    directly; genai feeds an `attention_mask` and lets the graph derive them (as its own model
    builder's graphs do): seqlens_k = sum(mask) - 1, total = mask width, both int32."""
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    names = {i.name: i for i in graph.input}
    if "seqlens_k" not in names or "attention_mask" in names:
        return
    for name in ("seqlens_k", "total_sequence_length"):
        graph.input.remove(names[name])
    graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "genai_one"),
                              numpy_helper.from_array(np.array(1, np.int32), "genai_one_i32")])
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "genai_one"], ["genai_mask_sum"], keepdims=0),
        helper.make_node("Cast", ["genai_mask_sum"], ["genai_mask_sum_i32"], to=TensorProto.INT32),
        helper.make_node("Sub", ["genai_mask_sum_i32", "genai_one_i32"], ["seqlens_k"]),
        helper.make_node("Shape", ["attention_mask"], ["genai_mask_shape"], start=1, end=2),
        helper.make_node("Cast", ["genai_mask_shape"], ["genai_total_1d"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["genai_total_1d"], ["total_sequence_length"]),
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


if __name__ == "__main__":
    print(make_copy(Path(sys.argv[1]), Path(sys.argv[2])))
