"""The benchmark's GGUF writer (benchmarks/gguf_writer.py) writes the GPT-2 twin so that llama.cpp's
f32 greedy tokens equal transformers'. llama.cpp runs in its peer venv (benchmarks/.venv-llamacpp,
a source build); where that venv is absent this is the one allowed skip (tests/ci_skips.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from benchmarks import peers
from benchmarks.gguf_writer import gguf_name

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "llama-cpp-python is not installed (benchmarks/.venv-llamacpp: python -m benchmarks.peers llamacpp)"


def _llamacpp_python() -> str | None:
    python = peers.python_of("llamacpp")
    if not python.is_file():
        return None
    ok = subprocess.run([str(python), "-c", "import llama_cpp, gguf"], capture_output=True).returncode == 0
    return str(python) if ok else None


def test_tensor_names_follow_llama_cpp_gpt2():
    assert gguf_name("transformer.h.3.attn.c_attn.weight") == "blk.3.attn_qkv.weight"
    assert gguf_name("transformer.h.0.mlp.c_proj.bias") == "blk.0.ffn_down.bias"
    assert gguf_name("transformer.wpe.weight") == "position_embd.weight"
    assert gguf_name("lm_head.weight") is None  # tied to token_embd
    assert gguf_name("transformer.h.1.attn.bias") is None  # the causal-mask buffer
    with pytest.raises(ValueError, match="unexpected"):
        gguf_name("transformer.h.0.attn.q_proj.weight")


def test_f32_gguf_greedy_equals_transformers(twins_dir, tmp_path):
    python = _llamacpp_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    twin = twins_dir / "gpt2-small-ja"
    prompt, n = list(range(10, 42)), 16
    request = json.dumps({"prompt": prompt, "n": n})
    proc = subprocess.run([python, "-m", "benchmarks.gguf_writer", str(twin), str(tmp_path / "twin.gguf"),
                           "--greedy", request], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert theirs == out[0, len(prompt):].tolist()
