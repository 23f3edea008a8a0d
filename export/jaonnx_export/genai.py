"""onnxruntime-genai interoperability: a decoder artifact also carries `genai_config.json`, so
genai's C++ loop (and its C#, Java and mobile bindings) runs the artifact directory unchanged.

genai feeds only the inputs it knows (input_ids, attention_mask, position_ids and the cache),
not `logits_to_keep`. An initializer default for that input was tried: ORT then drops it from
the IO-binding inputs the runtime's DecoderSession binds, so it cannot work for both. Instead
genai gets its own graph proto, `genai.onnx`, with `logits_to_keep` a constant that keeps every
position (what genai's prompt step binds: [batch, sequence, vocab]). Both protos read the same
weights in `model.onnx.data`, so the artifact's weights are stored once (a decoder's weights are
moved to external data for that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest

from .onnx_files import write_model

CONFIG_NAME = "genai_config.json"
GRAPH_NAME = "genai.onnx"
KEEP_ALL = 1 << 30  # more positions than any sequence -> all of them


def _genai_graph(out: Path, manifest: Manifest) -> bool:
    """Write genai.onnx next to model.onnx; False when the graph has no logits_to_keep."""
    import onnx
    from onnx import numpy_helper

    model_path = out / manifest.model_file
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name != "logits_to_keep"]
    if len(inputs) == len(model.graph.input):
        return False
    if not manifest.external_data:  # weights inline: move them out so both protos share them
        data_file = f"{manifest.model_file}.data"
        write_model(onnx.load(str(model_path)), model_path, data_file)
        (out / data_file).chmod(0o644)  # as readable as model.onnx was
        manifest.external_data = data_file
        model = onnx.load(str(model_path), load_external_data=False)
        inputs = [i for i in model.graph.input if i.name != "logits_to_keep"]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.append(numpy_helper.from_array(np.array([KEEP_ALL], dtype=np.int64), "logits_to_keep"))
    onnx.save_model(model, str(out / GRAPH_NAME))  # external references kept as they are
    return True


def genai_config(manifest: Manifest, config: Any) -> dict[str, Any]:
    """The genai_config.json for a GPT-2-layout decoder artifact (greedy search by default)."""
    shape = manifest.decoder
    ids = manifest.special_ids
    eos = ids.get("eos", ids.get("sep", 0))
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": GRAPH_NAME,
        "head_size": shape.head_dim,
        "hidden_size": shape.num_heads * shape.head_dim,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    return {
        "model": {
            "type": "llama",  # genai's generic decoder with separate key/value caches ("gpt2" means one fused cache)
            "bos_token_id": ids.get("bos", eos),
            "eos_token_id": eos,
            "pad_token_id": ids.get("pad", eos),
            "vocab_size": manifest.vocab_size,
            "context_length": manifest.max_positions,
            "decoder": decoder,
        },
        "search": {
            "max_length": manifest.max_positions, "min_length": 0, "do_sample": False, "num_beams": 1,
            "num_return_sequences": 1, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "length_penalty": 1.0, "diversity_penalty": 0.0, "early_stopping": True,
            "past_present_share_buffer": False,
        },
    }


def write_genai_files(out: Path, manifest: Manifest, config: Any) -> Path | None:
    """For a decoder artifact in `out`: genai.onnx and genai_config.json (None: not a decoder)."""
    if manifest.task != "text-generation" or manifest.decoder is None:
        return None
    # The concat layout (past_key_values.* in, present.* out, growing each step) is what this
    # config describes; an in-place (static/GQA) cache would need genai's shared-buffer mode.
    if getattr(manifest.decoder, "kv_layout", "concat") != "concat" or not (
        "past_key_values.0.key" in manifest.inputs and "present.0.key" in manifest.outputs
    ):
        return None
    if not _genai_graph(out, manifest):
        return None
    path = out / CONFIG_NAME
    path.write_text(json.dumps(genai_config(manifest, config), indent=2) + "\n", encoding="utf-8")
    return path
