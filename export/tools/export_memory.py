"""Peak RSS of `jaonnx export` for the japanese-gpt-1b shape (random weights), fp32 and int8.

    python export/tools/export_memory.py TOKENIZER_DIR WORK_DIR [fp32] [int8]

TOKENIZER_DIR holds spiece.model + tokenizer/special-token JSON (e.g. the rinna-gpt-1b twin's);
the model is the real config (24 layers, 2048 hidden, 16 heads, vocab 44928, 1024 positions)
with random weights. Each export runs in its own process; its peak RSS is read from wait4().
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {"n_layer": 24, "n_embd": 2048, "n_head": 16, "n_inner": 8192, "vocab_size": 44928, "n_positions": 1024,
          "bos_token_id": 2, "eos_token_id": 3, "activation_function": "gelu_fast"}


if os.environ.get("JAONNX_MEMORY_TINY"):  # a smoke test of this script
    CONFIG |= {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 256}


def build(tokenizer_dir: Path, checkpoint: Path) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIG, architectures=["GPT2LMHeadModel"])
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(checkpoint)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, checkpoint / name)
    return sum(p.numel() for p in model.parameters())


def peak_rss(command: list[str]) -> tuple[int, float, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20, time.perf_counter() - started


def main() -> None:
    tokenizer_dir, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    modes = sys.argv[3:] or ["fp32", "int8"]
    checkpoint = work / "gpt-1b-random"
    if not (checkpoint / "config.json").is_file():
        code = f"import sys; sys.path[:0] = {sys.path!r}; from export_memory import build; from pathlib import Path; " \
               f"print(build(Path({str(tokenizer_dir)!r}), Path({str(checkpoint)!r})))"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
    weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    results = {"fp32_weights_gb": weights / 1e9}
    for mode in modes:
        extra = ["--quantize", "int8"] if mode == "int8" else []
        out = work / f"artifact-{mode}"
        rc, peak_gib, seconds = peak_rss([sys.executable, "-m", "jaonnx", "export", str(checkpoint), "-o", str(out),
                                          "--recipe", "rinna-gpt-1b", *extra])
        results[mode] = {"rc": rc, "peak_rss_gb": peak_gib * 2**30 / 1e9, "seconds": round(seconds, 1),
                         "ratio_to_fp32_weights": peak_gib * 2**30 / weights}
        print(json.dumps(results), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
