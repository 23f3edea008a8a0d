"""Generation: greedy tokens identical to transformers' generate, KV cache, sampling, scoring."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import export_via_cli, run_cli
from helpers import hf_model, hf_tokenizer, one_token_text

import jaonnx
from jaonnx.errors import JaonnxError

GPT = ["gpt2-small-ja", "rinna-gpt-1b"]
PROMPT = "近年の機械学習は"
BATCH = ["西田幾多郎は、", "今日は", "4年に1度オリンピックは開かれる。"]
NEW = 32


@pytest.fixture(scope="module", params=GPT)
def gpt(request, artifacts, twins_dir):
    recipe = request.param
    return recipe, jaonnx.load(artifacts[recipe]), hf_tokenizer(twins_dir / recipe), hf_model(twins_dir / recipe)


def hf_greedy(model, rows: list[list[int]], pad: int, **kwargs) -> list[list[int]]:
    """transformers' generate(do_sample=False) on a left-padded batch; new tokens per row."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs.setdefault("max_new_tokens", NEW)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **kwargs)
    return out[:, width:].tolist()


def test_card_tokenization(gpt):
    """Prompts are encoded as the cards do: add_special_tokens=False."""
    _, gen, tok, _ = gpt
    for text in [PROMPT, *BATCH]:
        assert gen.encode(text) == tok.encode(text, add_special_tokens=False)


def test_greedy_matches_transformers_single_prompt(gpt):
    _, gen, _, model = gpt
    result = gen.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_ids=True)
    expected = hf_greedy(model, [result.prompt_ids], gen.pad_id, min_new_tokens=NEW)[0]
    assert len(set(expected)) >= 8, "twin decodes degenerately: it could hide a KV-cache bug"
    assert result.generated_ids == expected


def test_greedy_matches_transformers_left_padded_batch(gpt):
    _, gen, _, model = gpt
    results = gen.generate(BATCH, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_ids=True)
    rows = [r.prompt_ids for r in results]
    assert len({len(r) for r in rows}) == 3  # three different lengths: real left padding
    expected = hf_greedy(model, rows, gen.pad_id, min_new_tokens=NEW)
    assert [r.generated_ids for r in results] == expected
    for text, r in zip(BATCH, results):  # and each row gives what it gives alone
        alone = gen.generate(text, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_ids=True)
        assert alone.generated_ids == r.generated_ids


def test_cached_step_logits_allclose(gpt):
    """The engine's batch: prefill, 6 cached steps and a 3-token block, each allclose to
    transformers' full-sequence logits; discarding the block's positions restores the cache."""
    _, gen, _, model = gpt
    ids = gen.encode(PROMPT)
    batch = gen.new_batch()
    sequence = list(ids)
    np.testing.assert_allclose(batch.logits(ids), hf_logits(model, sequence)[0], atol=1e-4)
    logits = batch.add([ids], reserve=len(ids) + 10)
    np.testing.assert_allclose(logits, hf_logits(model, sequence)[:, -1], atol=1e-4)
    for _ in range(6):
        sequence.append(int(logits[0].argmax()))
        logits = batch.step(np.array([[sequence[-1]]]))[:, -1]
        np.testing.assert_allclose(logits, hf_logits(model, sequence)[:, -1], atol=1e-4)
    block = [int(logits[0].argmax()), 5, 9]
    np.testing.assert_allclose(batch.step(np.array([block]))[0], hf_logits(model, sequence + block)[0, -3:], atol=1e-4)
    batch.discard(2)  # keep only the first token of the block
    sequence.append(block[0])
    after = batch.step(np.array([[7]]))[:, -1]
    np.testing.assert_allclose(after, hf_logits(model, sequence + [7])[:, -1], atol=1e-4)


def hf_logits(model, sequence: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([sequence])).logits.numpy()


def test_decoded_text_is_exact(gpt):
    _, gen, tok, _ = gpt
    result = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False, return_ids=True)
    expected = tok.decode(result.prompt_ids + result.generated_ids, skip_special_tokens=True)
    assert gen.tokenizer.decode(result.prompt_ids) + result.text == expected
    assert result.full_text == PROMPT + result.text


def test_stream_pieces_join_to_the_full_text(gpt):
    _, gen, _, _ = gpt
    pieces = list(gen.stream(PROMPT, max_new_tokens=NEW, seed=3, do_sample=True))
    assert len(pieces) > 3
    assert "".join(pieces) == gen.generate(PROMPT, max_new_tokens=NEW, seed=3, do_sample=True, num_return_sequences=1)


def test_seeded_sampling_is_reproducible(gpt):
    _, gen, _, _ = gpt
    a = gen.generate(BATCH, max_new_tokens=16, do_sample=True, seed=7)
    b = gen.generate(BATCH, max_new_tokens=16, do_sample=True, seed=7)
    c = gen.generate(BATCH, max_new_tokens=16, do_sample=True, seed=8)
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_equal_greedy(gpt):
    _, gen, _, _ = gpt
    greedy = gen.generate(PROMPT, max_new_tokens=16, do_sample=False)
    assert gen.generate(PROMPT, max_new_tokens=16, do_sample=True, top_k=1, seed=1, num_return_sequences=1) == greedy
    assert gen.generate(PROMPT, max_new_tokens=16, do_sample=True, top_k=0, top_p=1e-9, seed=1, num_return_sequences=1) == greedy


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.5},
        {"bad_words_ids": "greedy-top"},
        {"min_new_tokens": 12, "eos_token_id": "greedy-third"},
    ],
    ids=["repetition_penalty", "bad_words", "min_new_tokens"],
)
def test_logits_processors_match_transformers(gpt, options):
    """Each processor changes the output, and changes it exactly as transformers does."""
    _, gen, _, model = gpt
    ids = gen.encode(PROMPT)
    plain = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None, return_ids=True)
    options = dict(options)
    if options.get("bad_words_ids") == "greedy-top":
        top = max(set(plain.generated_ids), key=plain.generated_ids.count)
        options["bad_words_ids"] = [[top]]
    if options.get("eos_token_id") == "greedy-third":
        options["eos_token_id"] = plain.generated_ids[2]
    ours = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False, return_ids=True, **options)
    hf_options = dict(options)
    hf_options.setdefault("eos_token_id", None)
    expected = hf_greedy(model, [ids], gen.pad_id, **hf_options)[0]
    if "eos_token_id" in options and options["eos_token_id"] is not None:
        stop = options["eos_token_id"]
        expected = expected[: expected.index(stop) + 1] if stop in expected else expected
        assert stop not in ours.generated_ids[: options["min_new_tokens"]]
        assert len(ours.generated_ids) > options["min_new_tokens"] - 1
    assert ours.generated_ids == expected
    assert ours.generated_ids != plain.generated_ids
    if "bad_words_ids" in options:
        assert options["bad_words_ids"][0][0] not in ours.generated_ids


def test_banned_word_never_sampled(gpt):
    _, gen, _, _ = gpt
    sampled = gen.generate([PROMPT] * 4, max_new_tokens=24, do_sample=True, top_k=3, seed=0, return_ids=True)
    seen = [t for r in sampled for t in r.generated_ids]
    common = max(set(seen), key=seen.count)
    again = gen.generate([PROMPT] * 4, max_new_tokens=24, do_sample=True, top_k=3, seed=0,
                         bad_words_ids=[[common]], return_ids=True)
    assert all(common not in r.generated_ids for r in again)


def test_card_defaults_come_from_the_recipe(artifacts):
    gen = jaonnx.load(artifacts["rinna-gpt-1b"])
    s = gen.settings(7)
    assert (s.do_sample, s.top_k, s.top_p) == (True, 500, 0.95)
    assert s.max_new_tokens == 93 and s.min_new_tokens == 93  # max_length = min_length = 100
    assert s.bad_words_ids == ((gen.manifest.special_ids["unk"],),)
    small = jaonnx.load(artifacts["gpt2-small-ja"]).settings(5)
    assert (small.do_sample, small.top_k, small.top_p, small.num_return_sequences) == (True, 50, 0.95, 3)


def test_num_return_sequences(artifacts):
    gen = jaonnx.load(artifacts["gpt2-small-ja"])
    texts = gen.generate(PROMPT, max_new_tokens=8, seed=1)  # the card's 3 samples
    assert isinstance(texts, list) and len(texts) == 3 and len(set(texts)) > 1


def test_score_matches_transformers_log_likelihood(gpt):
    _, gen, _, model = gpt
    texts = ["近年の機械学習は急速に進歩している。", "今日はいい天気ですね。"]
    results = gen.score(texts)
    for text, r in zip(texts, results):
        ids = torch.tensor([gen.encode(text)])
        with torch.no_grad():
            loss = float(model(ids, labels=ids).loss)
        n = ids.shape[1] - 1
        assert r.num_tokens == n
        assert r.log_likelihood == pytest.approx(-loss * n, rel=1e-4)
        assert r.perplexity == pytest.approx(float(np.exp(loss)), rel=1e-4)


def test_external_data_always_is_movable_and_identical(twins_dir, cache_dir, tmp_path, artifacts):
    out = export_via_cli(twins_dir / "gpt2-small-ja", cache_dir / "external" / "gpt2-small-ja", "--external-data", "always")
    # a static-layout decoder (the default): no genai files (see test_genai.py for the concat layout)
    assert sorted(p.name for p in out.iterdir()) == ["jaonnx.json", "model.onnx", "model.onnx.data", "spiece.model"]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    gen = jaonnx.load(moved)
    assert gen.manifest.external_data == "model.onnx.data"
    reference = jaonnx.load(artifacts["gpt2-small-ja"])
    options = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert gen.generate(BATCH, **options) == reference.generate(BATCH, **options)


def test_gpt_1b_twin_has_the_real_depth(artifacts):
    shape = jaonnx.load(artifacts["rinna-gpt-1b"]).manifest.decoder
    assert shape.num_layers == 24 and shape.num_heads == 16


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g: g.generate(""), "empty prompt"),
        (lambda g: g.generate("  "), "empty prompt"),
        (lambda g: g.generate(PROMPT, max_new_tokens=0), "max_new_tokens"),
        (lambda g: g.generate(PROMPT, top_p=0.0), "top_p"),
        (lambda g: g.generate(PROMPT, top_p=1.5), "top_p"),
        (lambda g: g.generate(PROMPT, temperature=-1.0), "temperature"),
        (lambda g: g.generate(PROMPT, top_k=-1), "top_k"),
        (lambda g: g.generate(PROMPT, repetition_penalty=0), "repetition_penalty"),
        (lambda g: g.generate(PROMPT, bad_words_ids=[[10**9]]), "bad_words_ids"),
        (lambda g: g.generate(PROMPT * 600, max_new_tokens=4), "positions"),
        (lambda g: g.generate(PROMPT, max_new_tokens=5000), "positions"),
        (lambda g: g.generate([]), "no prompts"),
        (lambda g: g.score(one_token_text(g)), "two"),
    ],
)
def test_bad_generation_input_is_a_clear_error(artifacts, call, message):
    gen = jaonnx.load(artifacts["gpt2-small-ja"])
    with pytest.raises(JaonnxError, match=message):
        call(gen)


def test_generate_cli_json_and_stream(artifacts):
    import json

    art = str(artifacts["gpt2-small-ja"])
    result = run_cli("generate", art, PROMPT, "--max-new-tokens", "8", "--greedy", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    gen = jaonnx.load(artifacts["gpt2-small-ja"])
    expected = gen.generate(PROMPT, max_new_tokens=8, do_sample=False, return_ids=True)
    assert data["generated_ids"] == expected.generated_ids and data["text"] == expected.text
    streamed = run_cli("generate", art, PROMPT, "-n", "8", "--greedy", "--stream")
    assert streamed.exit_code == 0 and streamed.output.rstrip("\n") == expected.full_text
