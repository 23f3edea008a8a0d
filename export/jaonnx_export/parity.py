"""ONNX vs PyTorch after export: the artifact must agree with the model run the card's way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.session import create_session
from jaonnx.tokenization import RecipeTokenizer

from .decoder_graph import empty_cache, sequence_feed

DEFAULT_TEXTS = [
    "4年に1度オリンピックは開かれる。",
    "大学で心理学の研究をしています。",
    "この患者はSLEと診断された。",
    "近年の機械学習は急速に進歩している。",
]
DECODE_STEPS = 4


def tolerance(reference: np.ndarray) -> float:
    """fp32 kernels differ in summation order: allow 1e-4 of the logit scale, at least 1e-3."""
    return max(1e-3, 1e-4 * float(np.abs(reference).max()))


def masked_batch(tokenizer: RecipeTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text with its middle token masked after tokenization, right-padded into a batch."""
    rows = []
    prefix, suffix = len(tokenizer.recipe.prefix), len(tokenizer.recipe.suffix)
    for text in texts:
        ids = tokenizer.encode_masked(text)
        middle = prefix + (len(ids) - prefix - suffix) // 2
        ids[middle] = tokenizer.mask_id
        rows.append(ids)
    width = max(map(len, rows))
    pad = tokenizer.special_ids.get("pad", 0)
    input_ids = np.array([r + [pad] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    return input_ids, mask


def mlm_feed(input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Graph inputs asking for logits at every position (what parity and quality compare)."""
    every = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()
    return {"input_ids": input_ids, "attention_mask": mask, "mask_positions": every}


def torch_masked_lm(model: Any, recipe: Any, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The card's way: explicit positions from `position_start`, segment ids 0."""
    import torch

    ids = torch.from_numpy(input_ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids) + recipe.position_start
    extra = {"token_type_ids": torch.zeros_like(ids)} if recipe.token_type_ids else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.from_numpy(mask), position_ids=positions, **extra)
    return out.logits.numpy()


def _fill_mask_parity(model: Any, session: Any, tokenizer: RecipeTokenizer, texts: list[str]) -> dict:
    input_ids, mask = masked_batch(tokenizer, texts)
    (logits,) = session.run(["logits"], mlm_feed(input_ids, mask))
    reference = torch_masked_lm(model, tokenizer.recipe, input_ids, mask)
    real = mask.astype(bool)
    diff = float(np.abs(logits - reference)[real].max())
    top1 = float((logits.argmax(-1) == reference.argmax(-1))[real].mean())
    return {"max_abs_logit_diff": diff, "top1_agreement": top1, "texts": len(texts), "tolerance": tolerance(reference)}


def empty_past(manifest: Manifest, batch: int) -> dict[str, np.ndarray]:
    shape = manifest.decoder
    return {
        name: np.zeros((batch, shape.num_heads, 0, shape.head_dim), dtype=np.float32)
        for name in manifest.inputs
        if name.startswith("past_key_values.")
    }


def prefill_feed(manifest: Manifest, ids: list[int]) -> dict[str, np.ndarray]:
    """Decoder inputs for one prompt against an empty cache, with logits at every position."""
    n = len(ids)
    if manifest.decoder.kv_layout == "static":
        return sequence_feed(manifest.decoder, ids, 0, n) | empty_cache(manifest.decoder, 1, 0)
    return {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
        "logits_to_keep": np.array([n], dtype=np.int64),
        **empty_past(manifest, 1),
    }


def _generation_parity(model: Any, session: Any, manifest: Manifest, tokenizer: RecipeTokenizer, texts: list[str]) -> dict:
    """Prefill logits for the whole prompt, then DECODE_STEPS cached greedy steps."""
    import torch

    worst, agree, total, ref_scale = 0.0, 0, 0, 0.0
    present_names = [n for n in manifest.outputs if n.startswith("present.")]
    for text in texts:
        ids = tokenizer.encode_text(text)
        feed = prefill_feed(manifest, ids)
        sequence = list(ids)
        for step in range(DECODE_STEPS + 1):
            logits, *present = session.run(None, feed)
            with torch.no_grad():
                reference = model(input_ids=torch.tensor([sequence])).logits.numpy()
            reference = reference[:, -logits.shape[1] :]
            worst = max(worst, float(np.abs(logits - reference).max()))
            ref_scale = max(ref_scale, float(np.abs(reference).max()))
            agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
            total += logits.shape[1]
            nxt = int(logits[0, -1].argmax())
            sequence.append(nxt)
            if manifest.decoder.kv_layout == "static":  # present is the whole cache, not just past + 1
                feed = sequence_feed(manifest.decoder, [nxt], len(sequence) - 1, 1)
            else:
                feed = {
                    "input_ids": np.array([[nxt]], dtype=np.int64),
                    "attention_mask": np.ones((1, len(sequence)), dtype=np.int64),
                    "position_ids": np.array([[len(sequence) - 1]], dtype=np.int64),
                    "logits_to_keep": np.array([1], dtype=np.int64),
                }
            feed |= {name.replace("present", "past_key_values"): value for name, value in zip(present_names, present)}
    return {
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / total,
        "texts": len(texts),
        "decode_steps": DECODE_STEPS,
        "tolerance": max(1e-3, 1e-4 * ref_scale),
    }


def check_parity(
    model: Any, out: Path, manifest: Manifest, tokenizer: RecipeTokenizer, texts: list[str] | None = None
) -> dict:
    texts = texts or DEFAULT_TEXTS
    session = create_session(out / manifest.model_file, providers="cpu", cache=False)
    if manifest.task == "fill-mask":
        report = _fill_mask_parity(model, session, tokenizer, texts)
    else:
        report = _generation_parity(model, session, manifest, tokenizer, texts)
    if report["max_abs_logit_diff"] > report["tolerance"]:
        raise JaonnxError(
            f"parity check failed: max |logit diff| {report['max_abs_logit_diff']:.3g} > "
            f"{report['tolerance']:.3g}; the artifact in {out} does not match PyTorch"
        )
    return report
