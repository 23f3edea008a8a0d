"""onnxruntime-genai runs a jaonnx decoder artifact unchanged (genai_config.json + genai.onnx,
which shares model.onnx's weights), and its greedy tokens equal jaonnx's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import GPT, MLM, export_via_cli

PROMPTS = ["近年の機械学習は", "東京は日本の首都であり、多くの人が"]
NEW_TOKENS = 16


def _genai_greedy(directory: Path, prompt_ids: list[int]) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]


@pytest.mark.parametrize("recipe", GPT)
def test_genai_greedy_tokens_equal_jaonnx(twins_dir: Path, cache_dir: Path, recipe: str) -> None:
    """genai reads the concat-layout graph (its GQA mode wants an attention-mask-driven graph)."""
    import jaonnx

    directory = export_via_cli(twins_dir / recipe, cache_dir / "concat" / recipe, "--kv-cache", "concat")
    config = json.loads((directory / "genai_config.json").read_text(encoding="utf-8"))
    assert config["model"]["decoder"]["filename"] == "genai.onnx"
    # one copy of the weights, read by both graph protos
    manifest = json.loads((directory / "jaonnx.json").read_text(encoding="utf-8"))
    assert manifest["external_data"] == "model.onnx.data"
    assert (directory / "genai.onnx").stat().st_size < (directory / "model.onnx.data").stat().st_size / 4
    generator = jaonnx.load(directory, providers="cpu")
    for prompt in PROMPTS:
        ours = generator.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0,
                                  min_new_tokens=0, bad_words_ids=[], return_ids=True)
        assert _genai_greedy(directory, ours.prompt_ids) == ours.generated_ids


def test_static_layout_artifacts_have_no_genai_config(artifacts: dict) -> None:
    assert jaonnx_layout(artifacts["gpt2-small-ja"]) == "static"
    assert not (artifacts["gpt2-small-ja"] / "genai_config.json").exists()


def jaonnx_layout(directory: Path) -> str:
    return json.loads((directory / "jaonnx.json").read_text(encoding="utf-8"))["decoder"]["kv_layout"]


@pytest.mark.parametrize("recipe", MLM)
def test_fill_mask_artifacts_have_no_genai_config(artifacts: dict, recipe: str) -> None:
    assert not (artifacts[recipe] / "genai_config.json").exists()
    assert not (artifacts[recipe] / "genai.onnx").exists()
