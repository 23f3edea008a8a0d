"""Quantized decoding through the KV cache (issue 17 item 3). For int8 and int4, on the static
and concat layouts, and for concat both the default export (fusions kept where measured
faster) and --no-optimize: transformers' greedy tokens are fed through the artifact's cache
one step at a time (teacher forcing), and

- the cached step logits agree with the same artifact's full-sequence logits (top-1 >= 0.95,
  max |diff| bounded): the cache path adds no error of its own;
- their top-1 agreement with transformers fp32 is at least the artifact's own quality report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import hf_model
from quantized_artifacts import RECIPE, export

NEW = 24
# Worst |cached - full-sequence| logit of the same artifact, as a fraction of the logit scale.
# Per-row quantization makes each position's linear layers identical in both paths; only the
# attention sums' order differs, and an activation rounding it flips moves a logit a little.
CACHE_DIFF = {"int8": 0.02, "int4": 0.04}


@pytest.fixture(scope="module")
def reference(twins_dir: Path):
    return hf_model(twins_dir / RECIPE)


def _cached(gen, ids: list[int], start: int) -> np.ndarray:
    """Logits at positions start-1 .. len(ids)-2: prefill ids[:start], then one cached step
    per following token (teacher forcing)."""
    batch = gen.new_batch()
    steps = [batch.add([ids[:start]], reserve=len(ids))[0]]
    for token in ids[start:-1]:
        steps.append(batch.step(np.array([[token]], dtype=np.int64))[0, -1])
    return np.stack(steps)


@pytest.fixture(scope="module")
def greedy(reference, twins_dir: Path, cache_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' greedy continuation) for held-out prompts."""
    import torch

    import jaonnx
    from jaonnx_export.twins import heldout_lines

    gen = jaonnx.load(export(twins_dir, cache_dir, "fp32", "static"), providers="cpu")
    out = []
    for text in heldout_lines()[40:44]:
        prompt = gen.encode(text[:30])
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        out.append((prompt, ids[0, len(prompt) :].tolist()))
    return out


@pytest.fixture(scope="module")
def heldout(reference, twins_dir: Path, cache_dir: Path) -> list[tuple[list[int], np.ndarray]]:
    """(ids, transformers' fp32 logits at every position) of the held-out sentences the
    export's quality report used."""
    import torch

    import jaonnx
    from jaonnx_export.precision import QUALITY_TEXTS
    from jaonnx_export.twins import heldout_lines

    gen = jaonnx.load(export(twins_dir, cache_dir, "fp32", "static"), providers="cpu")
    out = []
    for text in heldout_lines()[:QUALITY_TEXTS]:
        ids = gen.encode(text)[: gen.manifest.max_positions]
        if len(ids) >= 2:
            with torch.no_grad():
                out.append((ids, reference(input_ids=torch.tensor([ids])).logits[0].numpy()))
    return out


@pytest.mark.parametrize("variant", ["static", "concat", "concat-default"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cached_steps_agree_with_full_sequence_and_transformers(
    twins_dir: Path, cache_dir: Path, greedy: list, heldout: list, precision: str, variant: str
) -> None:
    import jaonnx

    gen = jaonnx.load(export(twins_dir, cache_dir, precision, variant), providers="cpu")
    assert gen.manifest.decoder.kv_layout == variant.split("-")[0]
    assert gen.manifest.quantization == precision
    report = gen.manifest.quality
    assert report["passed"]
    if variant == "concat-default":
        assert "decision" in report["optimization"]  # the fusions were measured, whichever won

    # Transformers' greedy tokens through the cache vs the same artifact's full-sequence logits.
    agree = total = 0
    worst = scale = 0.0
    for prompt, tokens in greedy:
        ids = prompt + tokens
        cached = _cached(gen, ids, len(prompt))
        full = gen.new_batch().logits(ids[:-1])[len(prompt) - 1 :]
        assert cached.shape == full.shape == (len(tokens), cached.shape[1])
        agree += int((cached.argmax(-1) == full.argmax(-1)).sum())
        total += len(tokens)
        worst = max(worst, float(np.abs(cached - full).max()))
        scale = max(scale, float(np.abs(full).max()))
    assert agree / total >= 0.95, agree / total
    assert worst <= CACHE_DIFF[precision] * scale, (worst, scale)

    # The report's held-out sentences, every position decoded through the cache, against
    # transformers fp32: at least the agreement the report measured on full sequences
    # (one flipped argmax of slack).
    agree = total = 0
    cut = gen.manifest.tokenizer_size
    for ids, expected in heldout:
        cached = np.concatenate([_cached(gen, ids, 1), gen.new_batch().logits(ids)[-1:]])  # + the last position
        agree += int((cached[:, :cut].argmax(-1) == expected[:, :cut].argmax(-1)).sum())
        total += len(ids)
    assert total == report["tokens"]
    assert agree / total >= report["top1_agreement"] - 1 / total, (agree / total, report["top1_agreement"])
