"""Peak RSS of a fresh process that loads an artifact and runs it once at a given batch:
`python -m jaonnx.bench.rss DIR BATCH THREADS` prints MiB. A separate process, so the number
is the model's own, not inflated by the bandwidth buffer or the bare loop's second session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def peak_rss_of_run(directory: str | Path, batch: int, threads: int) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "jaonnx.bench.rss", str(directory), str(batch), str(threads)],
                          capture_output=True, text=True, timeout=900)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _main(directory: str, batch: int, threads: int) -> None:
    import jaonnx

    from .machine import peak_rss_mib
    from .prompts import prefix_with_tokens

    model = jaonnx.load(directory, providers="cpu", intra_op_threads=threads)
    if model.task == "text-generation":
        prompt = prefix_with_tokens(lambda t: len(model.encode(t)), 64)
        model.generate([prompt] * batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    else:
        mask = model.recipe.special.mask or "[MASK]"
        model([prefix_with_tokens(lambda t: len(model.tokenizer.encode_masked(t)), 128, mask)] * batch)
    print(peak_rss_mib())


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
