"""Every user error is one line on stderr with exit code 2; the runtime never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import assert_one_line_error, jaonnx_cli

import jaonnx
from jaonnx.errors import JaonnxError
from jaonnx.recipes import detect_recipe, get_recipe


def test_runtime_imports_neither_torch_nor_transformers(artifacts):
    code = textwrap.dedent(
        f"""
        import sys, jaonnx
        fm = jaonnx.load({str(artifacts['rinna-roberta'])!r})
        fm("4年に1度[MASK]は開かれる。")
        gen = jaonnx.load({str(artifacts['gpt2-small-ja'])!r})
        gen.generate("今日は", max_new_tokens=4, do_sample=False)
        list(gen.stream("今日は", max_new_tokens=4))
        gen.score("今日はいい天気")
        import jaonnx.cli
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "jaonnx_export"))
        print(",".join(bad))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_missing_artifact_directory(tmp_path):
    proc = jaonnx_cli("fill-mask", str(tmp_path / "nope"), "[MASK]です")
    assert_one_line_error(proc, "does not exist", "jaonnx export")


def test_directory_without_manifest(tmp_path):
    proc = jaonnx_cli("fill-mask", str(tmp_path), "[MASK]です")
    assert_one_line_error(proc, "not a jaonnx artifact")


def test_incomplete_artifact(artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["ken11-albert"], broken)
    (broken / "model.onnx").unlink()
    proc = jaonnx_cli("fill-mask", str(broken), "[MASK]です")
    assert_one_line_error(proc, "incomplete", "model.onnx")


def test_corrupt_manifest(artifacts, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(artifacts["ken11-albert"], broken)
    (broken / "jaonnx.json").write_text("{not json", encoding="utf-8")
    assert_one_line_error(jaonnx_cli("fill-mask", str(broken), "[MASK]です"), "corrupt")


def test_corrupt_model_file(artifacts, tmp_path):
    broken = tmp_path / "garbage"
    shutil.copytree(artifacts["ken11-albert"], broken)
    (broken / "model.onnx").write_bytes(b"\x00garbage")
    assert_one_line_error(jaonnx_cli("fill-mask", str(broken), "[MASK]です"), "cannot load")


def test_manifest_with_unknown_recipe(artifacts, tmp_path):
    broken = tmp_path / "unknown"
    shutil.copytree(artifacts["ken11-albert"], broken)
    data = json.loads((broken / "jaonnx.json").read_text(encoding="utf-8"))
    data["recipe"] = "no-such-model"
    (broken / "jaonnx.json").write_text(json.dumps(data), encoding="utf-8")
    # format 2 records its recipe: a recipe id that disagrees with it is corruption
    assert_one_line_error(jaonnx_cli("fill-mask", str(broken), "[MASK]です"), "corrupt", "recipe_spec")
    # format 1 names its recipe only: this jaonnx must know it
    data = {k: v for k, v in data.items() if k not in ("recipe_spec", "tokenizer_size", "checks")}
    (broken / "jaonnx.json").write_text(json.dumps({**data, "format_version": 1}), encoding="utf-8")
    assert_one_line_error(jaonnx_cli("fill-mask", str(broken), "[MASK]です"), "unknown recipe")


def test_text_without_mask(artifacts):
    assert_one_line_error(jaonnx_cli("fill-mask", str(artifacts["ken11-albert"]), "大学で研究をしています"), "no [MASK]")


def test_empty_text(artifacts):
    assert_one_line_error(jaonnx_cli("fill-mask", str(artifacts["ken11-albert"]), "  "), "empty text")


def test_text_longer_than_the_position_table(artifacts):
    fm = jaonnx.load(artifacts["jmedroberta"])
    with pytest.raises(JaonnxError, match="at most 512"):
        fm("この患者は" * 400 + "[MASK]")


def test_bad_top_k(artifacts):
    fm = jaonnx.load(artifacts["jmedroberta"])
    with pytest.raises(JaonnxError, match="top_k"):
        fm("この患者は[MASK]", top_k=0)


def test_wrong_task_on_the_command_line(artifacts):
    assert_one_line_error(jaonnx_cli("generate", str(artifacts["ken11-albert"]), "今日は"), "fill-mask")
    assert_one_line_error(jaonnx_cli("fill-mask", str(artifacts["gpt2-small-ja"]), "[MASK]"), "generate")


def test_generation_errors_on_the_command_line(artifacts):
    art = str(artifacts["gpt2-small-ja"])
    assert_one_line_error(jaonnx_cli("generate", art, ""), "empty prompt")
    assert_one_line_error(jaonnx_cli("generate", art, "今日は", "--max-new-tokens", "0"), "max_new_tokens")
    assert_one_line_error(jaonnx_cli("generate", art, "今日は", "--top-p", "2"), "top_p")
    assert_one_line_error(jaonnx_cli("generate", art, "今日は", "--temperature", "-1"), "temperature")
    assert_one_line_error(jaonnx_cli("generate", art, "今日は", "--top-k", "-3"), "top_k")


def test_unknown_recipe_on_export(twins_dir, tmp_path):
    proc = jaonnx_cli("export", str(twins_dir / "ken11-albert"), "-o", str(tmp_path / "x"), "--recipe", "nope")
    assert_one_line_error(proc, "unknown recipe", "rinna-roberta")


def test_hub_id_while_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = jaonnx_cli("export", "rinna/japanese-roberta-base", "-o", str(tmp_path / "x"), env=env)
    assert_one_line_error(proc, "cannot download rinna/japanese-roberta-base", "local directory")


def test_hub_id_without_a_recipe(tmp_path):
    proc = jaonnx_cli("export", "someone/some-model", "-o", str(tmp_path / "x"))
    assert_one_line_error(proc, "no recipe", "--recipe")


def test_export_of_a_directory_that_is_not_a_checkpoint(tmp_path):
    assert_one_line_error(jaonnx_cli("export", str(tmp_path), "-o", str(tmp_path / "x")), "no config.json")


def test_recipe_lookup_and_detection():
    assert get_recipe("rinna/japanese-gpt-1b").id == "rinna-gpt-1b"
    assert detect_recipe("GPT2LMHeadModel", "BertGenerationTokenizer").id == "gpt2-small-ja"
    assert detect_recipe("GPT2LMHeadModel", "T5Tokenizer").id == "rinna-gpt-1b"
    assert detect_recipe("AlbertForMaskedLM", "AlbertTokenizerFast").id == "ken11-albert"
    with pytest.raises(JaonnxError, match="--recipe"):
        detect_recipe("GPT2LMHeadModel", None)


def test_to_fullwidth():
    from jaonnx.tokenization import to_fullwidth

    assert to_fullwidth("SLE 1ｶﾞ!") == "ＳＬＥ\u3000１ガ！"
    assert to_fullwidth("患者") == "患者"
