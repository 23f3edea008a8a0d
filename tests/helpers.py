"""Reference helpers: transformers run the way each model card says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np


def hf_tokenizer(twin: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(twin)


def hf_model(twin: Path):
    import transformers

    from jaonnx_export.sources import resolve

    recipe = resolve(str(twin)).recipe
    return getattr(transformers, recipe.architecture).from_pretrained(twin).eval()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def jaonnx_cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the real `jaonnx` entry point in a new process, as a user would."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jaonnx", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
