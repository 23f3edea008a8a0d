"""ONNX vs PyTorch after export: the artifact, run through the runtime's own classes, must
agree with the PyTorch logits computed beforehand (references.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError

from .references import DECODE_STEPS, ParityReference
from .runtime_logits import RuntimeLogits


def tolerance(reference: list[np.ndarray]) -> float:
    """fp32 kernels differ in summation order: allow 1e-4 of the logit scale, at least 1e-3."""
    return max(1e-3, 1e-4 * max(float(np.abs(r).max()) for r in reference))


def runtime_logits(directory: Path, manifest: Manifest, ref: ParityReference) -> list[np.ndarray]:
    """The artifact's logits for each reference row: decoders prefill the prompt and then take
    the reference's greedy tokens one step at a time; encoders run every position, after
    checking that FillMask encodes each text to the reference's ids."""
    run = RuntimeLogits(directory, manifest)
    if ref.prompt_lengths:
        return [run.decode(row, n) for row, n in zip(ref.rows, ref.prompt_lengths)]
    if [run.model.encode(text)["input_ids"] for text in ref.texts] != ref.rows:
        raise JaonnxError("parity check failed: FillMask.encode disagrees with the reference ids (a jaonnx bug)")
    return run.every_position(ref.rows)


def check_parity(directory: Path, manifest: Manifest, ref: ParityReference, atol: float | None = None) -> dict[str, Any]:
    """Max |logit diff| and top-1 agreement; above the tolerance (or `atol`) is an error."""
    found = runtime_logits(directory, manifest, ref)
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
