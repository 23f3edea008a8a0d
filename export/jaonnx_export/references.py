"""The PyTorch side of every check: reference inputs, and the model run the card's way.

All reference outputs are computed while the PyTorch model is alive and before any ONNX
Runtime session opens, so export never holds both copies of the weights (see export.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaonnx.tokenization import RecipeTokenizer

DEFAULT_TEXTS = [
    "4年に1度オリンピックは開かれる。",
    "大学で心理学の研究をしています。",
    "この患者はSLEと診断された。",
    "近年の機械学習は急速に進歩している。",
]
DECODE_STEPS = 4


def with_mask(text: str, mask: str) -> str:
    """`text` as a user would type it for fill-mask: unchanged when it has a mask, else with
    one typed in the middle."""
    if mask in text:
        return text
    middle = len(text) // 2
    return text[:middle] + mask + text[middle:]


@dataclass
class ParityReference:
    """What the ONNX graph must reproduce: per-text inputs and PyTorch logits."""

    task: str
    texts: list[str]
    rows: list[list[int]]  # token ids of each text (fill-mask) or prompt + greedy tokens (generation)
    prompt_lengths: list[int] = field(default_factory=list)  # generation only
    logits: list[np.ndarray] = field(default_factory=list)  # per text: [tokens, vocab]


def torch_masked_lm(model: Any, recipe: Any, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The card's way: explicit positions from `position_start`, segment ids 0."""
    import torch

    ids = torch.from_numpy(input_ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids) + recipe.position_start
    extra = {"token_type_ids": torch.zeros_like(ids)} if recipe.token_type_ids else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.from_numpy(mask), position_ids=positions, **extra)
    return out.logits.numpy()


def right_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    input_ids = np.array([r + [pad] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    return input_ids, mask


def fill_mask_reference(model: Any, tokenizer: RecipeTokenizer, texts: list[str] | None = None) -> ParityReference:
    """Each text with a typed mask, encoded by the runtime's tokenizer, in one right-padded
    batch: PyTorch logits at every real position."""
    texts = [with_mask(t, tokenizer.mask_token or "[MASK]") for t in texts or DEFAULT_TEXTS]
    rows = [tokenizer.encode_masked(t) for t in texts]
    input_ids, mask = right_padded(rows, tokenizer.special_ids.get("pad", 0))
    logits = torch_masked_lm(model, tokenizer.recipe, input_ids, mask)
    return ParityReference("fill-mask", texts, rows, logits=[logits[i, : len(r)] for i, r in enumerate(rows)])


def generation_reference(model: Any, tokenizer: RecipeTokenizer, texts: list[str] | None = None) -> ParityReference:
    """Each prompt extended by DECODE_STEPS greedy tokens (never an id the tokenizer lacks),
    with the logits of every position from one causal forward."""
    import torch

    ref = ParityReference("text-generation", list(texts or DEFAULT_TEXTS), [])
    for text in ref.texts:
        sequence = tokenizer.encode_text(text)
        ref.prompt_lengths.append(len(sequence))
        with torch.no_grad():
            for _ in range(DECODE_STEPS):
                nxt = model(input_ids=torch.tensor([sequence])).logits[0, -1, : tokenizer.vocab_size]
                sequence.append(int(nxt.argmax()))
            ref.logits.append(model(input_ids=torch.tensor([sequence])).logits[0].numpy())
        ref.rows.append(sequence)
    return ref


def parity_reference(task: str, model: Any, tokenizer: RecipeTokenizer, texts: list[str] | None = None) -> ParityReference:
    """The reference the task's parity check compares against (adapters know nothing of it)."""
    builders = {"fill-mask": fill_mask_reference, "text-generation": generation_reference}
    return builders[task](model, tokenizer, texts)


# The masked batch the quality report feeds (quality.reference_logits).
def masked_batch(tokenizer: RecipeTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text with its middle token masked after tokenization, right-padded into a batch."""
    rows = []
    prefix, suffix = len(tokenizer.recipe.prefix), len(tokenizer.recipe.suffix)
    for text in texts:
        ids = tokenizer.encode_masked(text)
        middle = prefix + (len(ids) - prefix - suffix) // 2
        ids[middle] = tokenizer.mask_id
        rows.append(ids)
    return right_padded(rows, tokenizer.special_ids.get("pad", 0))
