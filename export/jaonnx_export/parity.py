"""ONNX vs PyTorch after export: the artifact, run through the runtime's own classes, must
agree with the PyTorch logits computed beforehand (references.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError

from .references import DECODE_STEPS, ParityReference


def tolerance(reference: list[np.ndarray]) -> float:
    """fp32 kernels differ in summation order: allow 1e-4 of the logit scale, at least 1e-3."""
    return max(1e-3, 1e-4 * max(float(np.abs(r).max()) for r in reference))


def fill_mask_logits(directory: Path, manifest: Manifest, ref: ParityReference) -> list[np.ndarray]:
    from jaonnx.fill_mask import FillMask

    fm = FillMask(directory, manifest, providers="cpu")
    rows = [fm.encode(text)["input_ids"] for text in ref.texts]
    if rows != ref.rows:
        raise JaonnxError("parity check failed: FillMask.encode disagrees with the reference ids (a jaonnx bug)")
    logits = fm.logits(rows, every_position=True)
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def generation_logits(directory: Path, manifest: Manifest, ref: ParityReference) -> list[np.ndarray]:
    """Each prompt's logits at every position, then the reference's greedy tokens fed one at a
    time through the engine's own batch (either KV-cache layout)."""
    from jaonnx.generation import TextGenerator

    generator = TextGenerator(directory, manifest, providers="cpu", cache=False)  # export files: no graph cache
    found = []
    for row, n in zip(ref.rows, ref.prompt_lengths):
        batch = generator.new_batch()
        steps = [batch.logits(row[:n])]
        batch.add([row[:n]], reserve=len(row))
        for i in range(n, len(row)):
            steps.append(batch.step(np.array([[row[i]]]))[0])
        found.append(np.concatenate(steps)[: len(row)])
    return found


def check_parity(
    adapter: Any, directory: Path, manifest: Manifest, ref: ParityReference, atol: float | None = None
) -> dict[str, Any]:
    """Max |logit diff| and top-1 agreement; above the tolerance (or `atol`) is an error."""
    found = adapter.runtime_logits(directory, manifest, ref)
    # Only ids the tokenizer can decode: the runtime masks the rest of a padded table.
    cut = manifest.tokenizer_size
    found = [f[..., :cut] for f in found]
    ref.logits = [r[..., :cut] for r in ref.logits]
    worst = max(float(np.abs(f - r).max()) for f, r in zip(found, ref.logits))
    agree = sum(int((f.argmax(-1) == r.argmax(-1)).sum()) for f, r in zip(found, ref.logits))
    total = sum(len(r) for r in ref.logits)
    limit = tolerance(ref.logits) if atol is None else float(atol)
    report: dict[str, Any] = {
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / total,
        "texts": len(ref.texts),
        "tolerance": limit,
        "tolerance_source": "default (1e-4 of the logit scale, at least 1e-3)" if atol is None else "--parity-atol",
    }
    if ref.prompt_lengths:
        report["decode_steps"] = DECODE_STEPS
    if worst > limit:
        raise JaonnxError(
            f"parity check failed: max |logit diff| {worst:.3g} > {limit:.3g}: the ONNX graph does not match "
            "PyTorch; nothing was written (pass --parity-atol to accept a larger difference)"
        )
    return report
