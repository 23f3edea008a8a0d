"""Reference helpers: transformers run the way each model card says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.decoder_loops import greedy_rows


# How each model card loads its tokenizer: (transformers class, from_pretrained kwargs).
CARD_TOKENIZERS = {
    "rinna-roberta": ("AutoTokenizer", {"use_fast": False}),  # + do_lower_case = True (see card_lower)
    "ken11-albert": ("AlbertTokenizerFast", {}),
    "jmedroberta": ("AutoTokenizer", {}),
    "rinna-gpt-1b": ("AutoTokenizer", {"use_fast": False}),
    "gpt2-small-ja": ("AutoTokenizer", {}),
}


def hf_tokenizer(twin: Path):
    """The twin's tokenizer loaded exactly as the model card loads the real one."""
    import transformers

    class_name, kwargs = CARD_TOKENIZERS[twin.name]
    tok = getattr(transformers, class_name).from_pretrained(twin, **kwargs)
    if twin.name == "rinna-roberta":
        tok.do_lower_case = True  # the card's line; transformers 5 ignores it (see card_lower)
    return tok


def card_lower(tok, text: str) -> str:
    """What `tokenizer.do_lower_case = True` did in transformers 4, which the rinna card was
    written for: lower-case the text except the special tokens (copied from transformers 4.x
    `PreTrainedTokenizer.tokenize`). transformers 5 no longer reads the attribute there."""
    import re

    specials = [re.escape(t) for t in tok.all_special_tokens]
    pattern = r"(" + r"|".join(specials) + r")|" + r"(.+?)"
    return re.sub(pattern, lambda m: m.groups()[0] or m.groups()[1].lower(), text)


def hf_model(twin: Path):
    import transformers

    from jaonnx_export.sources import resolve

    recipe = resolve(str(twin)).recipe
    return getattr(transformers, recipe.architecture).from_pretrained(twin).eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' full-sequence logits [len(ids), vocab] of one text."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of `ids` by `new` tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def batch_greedy(decoder, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy ids of every prompt through a `BatchDecoder` directly: add them, then step."""
    return greedy_rows(decoder, prompts, new)[0]


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


def one_token_text(gen) -> str:
    """A text the tokenizer encodes as a single token (a "▁word" piece of the vocabulary)."""
    backend = gen.tokenizer.backend
    for i in range(backend.vocab_size):
        piece = backend.id_to_piece(i)
        if piece.startswith("▁") and len(piece) > 1 and gen.encode(piece[1:]) == [i]:
            return piece[1:]
    raise AssertionError("no single-token word in the vocabulary")
