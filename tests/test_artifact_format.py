"""The artifact describes itself (format 2), older artifacts still load, and no input, however
odd, gets past the public entry points as anything but a one-line JaonnxError."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, jaonnx_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaonnx
from jaonnx import recipes
from jaonnx.artifact import FORMAT_VERSION, MANIFEST_NAME
from jaonnx.errors import JaonnxError


def copy(artifact: Path, tmp_path: Path, name: str = "a") -> Path:
    target = tmp_path / name
    shutil.copytree(artifact, target)
    return target


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_manifest_records_the_resolved_recipe(artifacts):
    for recipe_id, path in artifacts.items():
        manifest = jaonnx.read_manifest(path)
        assert manifest.format_version == FORMAT_VERSION == 2
        assert manifest.recipe_spec == recipes.get_recipe(recipe_id)
        data = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))["recipe_spec"]
        assert data["normalizers"] == list(recipes.get_recipe(recipe_id).normalizers)
        assert set(data["special"]) >= {"mask", "eos", "pad"} and "generation" in data


def test_editing_recipes_py_does_not_change_an_exported_artifact(artifacts, monkeypatch):
    """The artifact keeps the recipe it was exported with (here: rinna's lower-casing)."""
    before = jaonnx.load(artifacts["rinna-roberta"]).encode("AIは[MASK]だ")["input_ids"]
    changed = dataclasses.replace(recipes.RECIPES["rinna-roberta"], normalizers=(), prefix=())
    monkeypatch.setitem(recipes.RECIPES, "rinna-roberta", changed)
    fm = jaonnx.load(artifacts["rinna-roberta"])
    assert fm.recipe.normalizers == ("lowercase",)
    assert fm.encode("AIは[MASK]だ")["input_ids"] == before


def test_format_1_manifest_still_loads(artifacts, tmp_path):
    """A manifest written before format 2: no recipe_spec, tokenizer_size or checks."""
    for recipe_id in ("ken11-albert", "gpt2-small-ja"):
        old = copy(artifacts[recipe_id], tmp_path, recipe_id)
        edit_manifest(old, format_version=1, recipe_spec=..., tokenizer_size=..., checks=...)
        model = jaonnx.load(old)
        assert model.manifest.format_version == 1 and model.recipe == recipes.get_recipe(recipe_id)
        new = jaonnx.load(artifacts[recipe_id])
        if recipe_id == "ken11-albert":
            assert model("大学で[MASK]の研究", top_k=3) == new("大学で[MASK]の研究", top_k=3)
        else:
            assert model.generate("今日は", max_new_tokens=4, do_sample=False) == \
                new.generate("今日は", max_new_tokens=4, do_sample=False)


def test_load_dispatches_through_the_task_registry(artifacts, tmp_path):
    from jaonnx.fill_mask import FillMask
    from jaonnx.generation import TextGenerator

    assert set(jaonnx.TASKS) == {"fill-mask", "text-generation"}
    assert type(jaonnx.load(artifacts["ken11-albert"])) is jaonnx.task_class("fill-mask") is FillMask
    assert jaonnx.task_class("text-generation") is TextGenerator
    other = copy(artifacts["ken11-albert"], tmp_path)
    edit_manifest(other, task="summarization")
    with pytest.raises(JaonnxError, match="task 'summarization' is not supported"):
        jaonnx.load(other)


CORRUPTIONS = [
    ("a JSON string", lambda d: "just a string", "must be a JSON object"),
    ("a string format_version", lambda d: {**d, "format_version": "2"}, "format_version"),
    ("a list recipe", lambda d: {**d, "recipe": ["x"]}, "manifest.recipe"),
    ("a null model_file", lambda d: {**d, "model_file": None}, "manifest.model_file"),
    ("a model_file outside", lambda d: {**d, "model_file": "../model.onnx"}, "plain file"),
    ("special ids as strings", lambda d: {**d, "special_ids": {"mask": "4"}}, "special_ids.mask"),
    ("an unknown normalizer", lambda d: {**d, "recipe_spec": {**d["recipe_spec"], "normalizers": ["rot13"]}},
     "normalizers[0]"),
    ("no decoder shape", lambda d: {**d, "decoder": None}, "decoder"),
    ("format 0", lambda d: {**d, "format_version": 0}, "format 0"),
    ("load-only ranges not pairs", lambda d: {**d, "load_only_data": [[4096, 512, 1]]}, "load_only_data"),
    ("a negative load-only offset", lambda d: {**d, "load_only_data": [[-1, 512]]}, "load_only_data"),
    ("load-only offsets as strings", lambda d: {**d, "load_only_data": [["4096", 512]]}, "load_only_data[0][0]"),
]


@pytest.mark.parametrize(("what", "corrupt", "needle"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_manifest_fields_are_one_line_errors(artifacts, tmp_path, what, corrupt, needle):
    broken = copy(artifacts["gpt2-small-ja"], tmp_path)
    path = broken / MANIFEST_NAME
    path.write_text(json.dumps(corrupt(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
    with pytest.raises(JaonnxError, match="re-run `jaonnx export`") as info:
        jaonnx.load(broken)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_newer_format_asks_for_an_upgrade(artifacts, tmp_path):
    newer = copy(artifacts["ken11-albert"], tmp_path)
    edit_manifest(newer, format_version=FORMAT_VERSION + 1)
    with pytest.raises(JaonnxError, match="upgrade jaonnx"):
        jaonnx.load(newer)


@pytest.mark.parametrize("recipe_id", ["rinna-roberta", "jmedroberta"])
def test_corrupt_tokenizer_file_is_a_one_line_error(artifacts, tmp_path, recipe_id):
    broken = copy(artifacts[recipe_id], tmp_path)
    name = jaonnx.read_manifest(broken).tokenizer_file
    (broken / name).write_bytes(b"\x00\x01 not a tokenizer {")
    assert_one_line_error(jaonnx_cli("fill-mask", str(broken), "[MASK]です"), "cannot read the tokenizer", name)


def test_swapped_tokenizer_file_is_caught(artifacts, tmp_path):
    """A tokenizer of another size than the manifest records (format 2)."""
    broken = copy(artifacts["rinna-gpt-1b"], tmp_path)
    shutil.copyfile(artifacts["gpt2-small-ja"] / "spiece.model", broken / "spiece.model")
    with pytest.raises(JaonnxError, match="ids but the manifest says"):
        jaonnx.load(broken)


def test_lone_surrogates_and_bad_arguments(artifacts):
    fm = jaonnx.load(artifacts["jmedroberta"])
    with pytest.raises(JaonnxError, match="lone surrogate"):
        fm("この患者は\ud800[MASK]")
    with pytest.raises(JaonnxError, match="lone surrogate"):
        fm.encode("\udcff[MASK]")
    with pytest.raises(JaonnxError, match="batch_size"):
        fm(["この[MASK]"], batch_size=0)
    with pytest.raises(JaonnxError, match="a text or a list"):
        fm(42)  # type: ignore[arg-type]
    with pytest.raises(JaonnxError, match="outside the tokenizer's vocabulary"):
        fm.tokenizer.decode([10**9])
    gen = jaonnx.load(artifacts["gpt2-small-ja"])
    with pytest.raises(JaonnxError, match="lone surrogate"):
        gen.generate("今日は\ud83d", max_new_tokens=2)


def test_non_utf8_command_line_text_is_a_one_line_error(artifacts):
    proc = subprocess.run(
        [sys.executable, "-m", "jaonnx", "fill-mask", str(artifacts["ken11-albert"]).encode(), b"\xff\xfe[MASK]"],
        capture_output=True, text=True, timeout=120,
    )
    assert_one_line_error(proc, "lone surrogate")


# ---- property test: corrupt manifests, corrupt tokenizers, odd strings ----

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
ODD_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", " ", "[MASK]", "[MASK]" * 600, "\ud800", "\x00[MASK]", "[CLS]", "ｶﾞ[MASK]\u3000", "\U0001f600[MASK]"]
)
MANIFEST_FIELDS = ["recipe", "task", "model_file", "tokenizer_file", "special_ids", "vocab_size", "max_positions",
                   "inputs", "outputs", "external_data", "decoder", "recipe_spec", "tokenizer_size",
                   "format_version", "quantization", "batch_invariant"]


FUZZED = ("rinna-roberta", "gpt2-small-ja", "ken11-albert")  # spiece.model x2, tokenizer.json


@pytest.fixture(scope="module")
def workspace(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {name: copy(artifacts[name], root, name) for name in FUZZED}


@st.composite
def corrupt_bytes(draw, kinds=("truncate", "garbage", "flip")):
    """A function that spoils a file's bytes: cut short, replaced, or a window inverted."""
    kind = draw(st.sampled_from(kinds))
    fraction = draw(st.floats(0, 1))
    width = draw(st.integers(1, 512))
    garbage = draw(st.binary(max_size=64))

    def spoil(data: bytes) -> bytes:
        at = int(len(data) * fraction)
        if kind == "truncate":
            return data[:at]
        if kind == "garbage":
            return garbage
        return data[:at] + bytes(b ^ 0xFF for b in data[at : at + width]) + data[at + width :]

    return spoil


def _call_everything(model, text: str) -> None:
    if model.task == "fill-mask":
        model.encode(text)
        model(text, top_k=2)
        model([text, text], top_k=1, batch_size=1)
    else:
        model.generate(text, max_new_tokens=2, do_sample=False)
        list(model.stream(text, max_new_tokens=2, do_sample=False))
        model.score(text)


@settings(max_examples=90, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(FUZZED),
    field=st.sampled_from(MANIFEST_FIELDS),
    value=JSON_VALUES,
    tokenizer_bytes=st.none() | st.binary(max_size=64) | corrupt_bytes(),
    model_bytes=st.none() | corrupt_bytes(),
    text=ODD_TEXT,
)
def test_only_jaonnx_errors_ever_escape(workspace, artifacts, name, field, value, tokenizer_bytes, model_bytes, text):
    directory = workspace[name]
    original = artifacts[name]
    manifest = json.loads((original / MANIFEST_NAME).read_text(encoding="utf-8"))
    tokenizer_file, model_file = manifest["tokenizer_file"], manifest["model_file"]
    (directory / MANIFEST_NAME).write_text(json.dumps({**manifest, field: value}), encoding="utf-8")
    for file, spoil in ((tokenizer_file, tokenizer_bytes), (model_file, model_bytes)):
        data = (original / file).read_bytes()
        if callable(spoil):
            data = spoil(data)
        elif spoil is not None:
            data = spoil
        (directory / file).write_bytes(data)
    try:
        model = jaonnx.load(directory, providers="cpu")
        _call_everything(model, text)
    except JaonnxError as exc:
        assert "\n" not in str(exc)
