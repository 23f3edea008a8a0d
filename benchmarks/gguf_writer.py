"""Write a GPT-2 checkpoint (safetensors + spiece.model) as an f32 GGUF file for llama.cpp, and
quantize it with llama.cpp's own quantizer.

Why our own writer: llama.cpp's converter wants a BPE tokenizer for GPT-2, while these models
use sentencepiece. The tensors follow llama.cpp's `convert_hf_to_gguf.py` for gpt2 (the HF Conv1D
weights are stored [in, out], so they are transposed; norms, biases and position embeddings stay
f32; no `output.weight`, so llama.cpp ties the LM head to `token_embd`). The vocabulary is a
T5/unigram one ("t5" model) with the spm's `precompiled_charsmap`: with it llama.cpp tokenizes
like sentencepiece, where an SPM ("llama") vocabulary aborts the process on a character that the
vocabulary lacks.

Runs in the llama.cpp peer venv (gguf, safetensors, sentencepiece, protobuf, llama-cpp-python):
`python -m benchmarks.gguf_writer CHECKPOINT OUT.gguf [--quantize q8_0,q4_0,q4_k_m]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"f32": 0, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_TOP_NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
              "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a GPT2LMHeadModel tensor; None for the ones it does not use."""
    name = hf_name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
        return None  # causal-mask buffers; the head is tied to token_embd
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "h" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"blk.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GPT-2 tensor {hf_name!r}")


def _vocabulary(spm_path: Path, vocab_size: int) -> dict[str, object]:
    """Tokens, scores, types and normalizer settings, as convert_hf_to_gguf's T5 vocabulary."""
    import gguf
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    if proto.trainer_spec.model_type != 1:
        raise ValueError(f"{spm_path} is not a unigram sentencepiece model")
    sp = SentencePieceProcessor(model_file=str(spm_path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i).encode(), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                    else gguf.TokenType.NORMAL)
    return {"tokens": tokens, "scores": scores, "types": types, "unk": sp.unk_id(),
            "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
            "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
            "charsmap": proto.normalizer_spec.precompiled_charsmap}


def write_gguf(checkpoint: str | Path, out: str | Path) -> Path:
    """The checkpoint as an all-f32 GGUF file (the input of llama.cpp's quantizer)."""
    import gguf
    from safetensors.numpy import load_file

    checkpoint, out = Path(checkpoint), Path(out)
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        raise ValueError(f"only gpt2 checkpoints are written, not {config.get('model_type')!r}")
    if config.get("activation_function", "gelu_new") != "gelu_new":
        raise ValueError("llama.cpp's gpt2 uses the tanh GELU (gelu_new)")
    n_embd = config["n_embd"]
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(checkpoint.name)
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config.get("n_inner") or 4 * n_embd)
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = _vocabulary(checkpoint / "spiece.model", config["vocab_size"])
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_add_space_prefix(vocab["add_space_prefix"])
    writer.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])
    if vocab["charsmap"]:
        writer.add_precompiled_charsmap(vocab["charsmap"])
    for role in ("unk", "bos", "eos", "pad"):
        if vocab[role] >= 0:
            getattr(writer, f"add_{role}_token_id")(vocab[role])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
        target = gguf_name(name)
        if target is None:
            continue
        data = tensor.astype(np.float32)
        if name.endswith(_CONV1D):
            data = np.ascontiguousarray(data.T)  # Conv1D keeps [in, out]; ggml wants [out, in]
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize(f32_gguf: str | Path, out: str | Path, kind: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` would run it."""
    import llama_cpp

    if kind not in FTYPES:
        raise ValueError(f"quantization must be one of {', '.join(FTYPES)}, not {kind!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {status}")
    return Path(out)


def last_logits(llm: object) -> np.ndarray:
    """The last evaluated token's logits (Llama.eval keeps no scores unless logits_all=True)."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def greedy(gguf_path: str | Path, prompt: list[int], n: int, threads: int = 2, flash_attn: bool = False) -> list[int]:
    """n greedy tokens after `prompt` (token ids: no tokenizer involved)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=max(64, len(prompt) + n), n_threads=threads,
                          n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
    out: list[int] = []
    tokens = list(prompt)
    llm.eval(tokens)
    for _ in range(n):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        llm.eval([token])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--quantize", default="", help="comma-separated: q8_0,q4_0,q4_k_m (files beside OUT)")
    parser.add_argument("--greedy", help="JSON {prompt: [ids], n: N}: print the f32 file's greedy tokens")
    args = parser.parse_args()
    out = write_gguf(args.checkpoint, args.out)
    for kind in filter(None, args.quantize.split(",")):
        quantize(out, out.with_name(out.stem + f"-{kind}.gguf"), kind)
    if args.greedy:
        req = json.loads(args.greedy)
        print(json.dumps({"tokens": greedy(out, req["prompt"], req["n"])}))


if __name__ == "__main__":
    main()
