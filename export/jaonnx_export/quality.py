"""The quality report: what a conversion (int8, int4, fp16, fusions) cost against the fp32
PyTorch model, measured through the runtime's own classes (runtime_logits.py, shared with parity),
and the gate that refuses an artifact below MIN_TOP1_AGREEMENT unless forced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.errors import JaonnxError
from jaonnx.tokenization import RecipeTokenizer

from .runtime_logits import RuntimeLogits

MIN_TOP1_AGREEMENT = 0.95  # below this a converted artifact is an error unless forced
QUALITY_TEXTS = 64  # held-out sentences used for the quality report


@dataclass
class Reference:
    """fp32 PyTorch logits on held-out sentences, computed once before any conversion."""

    task: str
    rows: list[list[list[int]]] = field(default_factory=list)  # batches of token-id rows
    logits: list[np.ndarray] = field(default_factory=list)  # [rows, width, vocab] per batch
    masks: list[np.ndarray] = field(default_factory=list)  # bool [rows, width]: the [MASK] slots


def reference_logits(model: Any, manifest: Manifest, tokenizer: RecipeTokenizer, texts: list[str],
                     batch_size: int = 8) -> Reference:
    """Teacher-forced logits of the PyTorch model: masked LM on each sentence with its middle
    token masked (every position); causal LM on each full sentence (every position)."""
    import torch

    from .references import masked_batch, torch_masked_lm

    ref = Reference(manifest.task)
    if manifest.task == "fill-mask":
        for start in range(0, len(texts), batch_size):
            ids, mask = masked_batch(tokenizer, texts[start : start + batch_size])
            ref.rows.append([row[: int(m.sum())].tolist() for row, m in zip(ids, mask)])
            ref.logits.append(torch_masked_lm(model, tokenizer.recipe, ids, mask))
            ref.masks.append(ids == tokenizer.mask_id)
        return ref
    for text in texts:
        ids = tokenizer.encode_text(text)[: manifest.max_positions]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits.numpy()
        ref.rows.append([ids])
        ref.logits.append(logits)
    return ref


def quality_report(directory: Path, manifest: Manifest, reference: Reference) -> dict[str, Any]:
    """Max |logit diff| and top-1 agreement of the artifact graph in `directory` against `reference`."""
    run = RuntimeLogits(directory, manifest)
    worst, agree, total, mask_agree, mask_total = 0.0, 0, 0, 0, 0
    cut = manifest.tokenizer_size  # a padded table: the runtime masks ids the tokenizer lacks
    for i, (rows, expected) in enumerate(zip(reference.rows, reference.logits)):
        for r, got in enumerate(run.every_position(rows)):
            got = np.asarray(got, dtype=np.float32)[:, :cut]
            want = expected[r, : len(got), :cut]
            worst = max(worst, float(np.abs(got - want).max()))
            same = got.argmax(-1) == want.argmax(-1)
            agree += int(same.sum())
            total += len(same)
            if reference.masks:
                masked = reference.masks[i][r, : len(same)]
                mask_agree += int(same[masked].sum())
                mask_total += int(masked.sum())
    report: dict[str, Any] = {
        "reference": "fp32 PyTorch (transformers), held-out sentences",
        "texts": sum(len(rows) for rows in reference.rows),
        "tokens": total,
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / max(total, 1),
    }
    if mask_total:
        report["top1_agreement_at_mask"] = mask_agree / mask_total
    return report


def gate(report: dict[str, Any], precision: str, force: bool, threshold: float | None = None) -> None:
    """< 95% top-1 agreement is an error unless forced; the verdict is stored either way."""
    threshold = MIN_TOP1_AGREEMENT if threshold is None else threshold
    report["threshold"] = threshold
    report["passed"] = report["top1_agreement"] >= threshold
    if not report["passed"]:
        report["forced"] = force
        if not force:
            raise JaonnxError(
                f"{precision} artifact has top-1 agreement {report['top1_agreement']:.3f} with the fp32 model "
                f"(< {threshold:.2f}) and max |logit diff| {report['max_abs_logit_diff']:.3g}: "
                "it is not written; pass --force to keep it anyway"
            )


def describe(report: dict[str, Any]) -> str:
    """One line for the export's progress output."""
    line = (f"quality ({report.get('precision', '?')}): max |logit diff| {report['max_abs_logit_diff']:.3g}, "
            f"top-1 agreement {report['top1_agreement']:.4f} on {report['texts']} held-out texts")
    if "top1_agreement_at_mask" in report:
        line += f" (at [MASK] {report['top1_agreement_at_mask']:.4f})"
    return line
