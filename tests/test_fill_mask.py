"""Fill-mask: the runtime against transformers run the way each card says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import card_lower, hf_model, hf_tokenizer, softmax

import jaonnx
from jaonnx_export.corpus import heldout_lines

MLM = ["rinna-roberta", "ken11-albert", "jmedroberta"]
SENTENCES = ["4年に1度オリンピックは開かれる。", "大学で心理学の研究をしています。", "この患者はSLEとCTで診断された。",
             "AIの研究はGPUで進む。"] + heldout_lines()[:6]


def card_tokens(recipe: str, tok, text: str) -> list[str]:
    """Tokens of the unmasked text as the card tokenizes it (after normalization)."""
    if recipe == "rinna-roberta":  # the card: "[CLS]" + text, do_lower_case
        return tok.tokenize(card_lower(tok, "[CLS]" + text))
    if recipe == "jmedroberta":  # the card: full-width input (mojimoji, an independent implementation)
        import mojimoji

        return [tok.cls_token, *tok.tokenize(mojimoji.han_to_zen(text)), tok.sep_token]
    return [tok.cls_token, *tok.tokenize(text), tok.sep_token]


def typed_text(tokens: list[str], masked: set[int], specials: set[str]) -> str:
    """The text a user types: the surface of the tokens with `[MASK]` in place of some."""
    parts = ["[MASK]" if i in masked else ("" if t in specials else t) for i, t in enumerate(tokens)]
    return "".join(parts).replace("▁", " ").strip()


def masked_cases(recipe: str, tok, limit: int = 8):
    """(typed text, card-way ids) pairs: single masks at several places, and double masks."""
    specials = set(tok.all_special_tokens)
    cases = []
    for text in SENTENCES:
        tokens = card_tokens(recipe, tok, text)
        # A lone "▁" (dummy prefix before a character with no "▁X" piece) cannot be typed,
        # nor can a mask be typed between it and its character: skip both.
        inner = [i for i, t in enumerate(tokens) if t not in specials and t != "▁" and tokens[i - 1] != "▁"]
        picks = [{inner[len(inner) // 2]}, {inner[0]}, {inner[1], inner[-1]}]
        for masked in picks:
            ids = tok.convert_tokens_to_ids(tokens)
            ids = [tok.mask_token_id if i in masked else t for i, t in enumerate(ids)]
            cases.append((typed_text(tokens, masked, specials), ids))
    return cases[: limit * 3]


@pytest.fixture(scope="module", params=MLM)
def mlm(request, artifacts, twins_dir):
    recipe = request.param
    return recipe, jaonnx.load(artifacts[recipe]), hf_tokenizer(twins_dir / recipe), hf_model(twins_dir / recipe)


def reference_logits(recipe: str, model, rows: list[list[int]], pad: int) -> np.ndarray:
    """transformers, the card's way: explicit positions from 0 for rinna; all-zero segments."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if recipe == "rinna-roberta":
        kwargs["position_ids"] = torch.arange(width).expand_as(ids)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def test_typed_mask_encodes_as_mask_after_tokenization(mlm):
    recipe, fm, tok, _ = mlm
    cases = masked_cases(recipe, tok)
    assert len(cases) >= 12
    for text, ids in cases:
        assert fm.encode(text)["input_ids"] == ids, text


def test_transformers_inserts_a_lone_prefix_after_a_typed_mask_and_we_do_not(mlm):
    recipe, fm, tok, _ = mlm
    text = "大学で[MASK]の研究をしています"
    hf_tokens = tok.tokenize(text)
    after = hf_tokens[hf_tokens.index("[MASK]") + 1]
    assert after == "▁"  # the bug both cards show, reproduced by the twin's own tokenizer
    ours = fm.encode(text)["input_ids"]
    following = ours[ours.index(fm.tokenizer.mask_id) + 1]
    assert tok.convert_ids_to_tokens(following) != "▁"
    if recipe == "ken11-albert":  # the card's fix: delete the token after the mask
        del hf_tokens[hf_tokens.index("[MASK]") + 1]
        card_ids = [tok.cls_token_id, *tok.convert_tokens_to_ids(hf_tokens), tok.sep_token_id]
        assert ours == card_ids


def test_top_k_and_probabilities_match_transformers(mlm):
    recipe, fm, tok, model = mlm
    for text, ids in masked_cases(recipe, tok, limit=3):
        logits = reference_logits(recipe, model, [ids], fm.pad_id)[0]
        masks = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
        result = fm(text, top_k=5)
        per_mask = result if len(masks) > 1 else [result]
        for position, predictions in zip(masks, per_mask):
            probs = softmax(logits[position].astype(np.float64))
            expected = np.argsort(-probs, kind="stable")[:5]
            assert [p["token"] for p in predictions] == expected.tolist(), text
            np.testing.assert_allclose([p["score"] for p in predictions], probs[expected], rtol=1e-4, atol=1e-6)


def test_padded_batch_gives_the_same_results_as_single_texts(mlm):
    recipe, fm, tok, model = mlm
    cases = masked_cases(recipe, tok, limit=4)
    texts = [c[0] for c in cases]
    lengths = {len(c[1]) for c in cases}
    assert len(lengths) > 1  # the batch really is padded
    batched = fm(texts, top_k=3)
    for text, out in zip(texts, batched):
        single = fm(text, top_k=3)
        flat_b = out if isinstance(out[0], dict) else [p for m in out for p in m]
        flat_s = single if isinstance(single[0], dict) else [p for m in single for p in m]
        assert [p["token"] for p in flat_b] == [p["token"] for p in flat_s]
        np.testing.assert_allclose([p["score"] for p in flat_b], [p["score"] for p in flat_s], rtol=1e-4, atol=1e-6)
    # and every padded row's logits equal transformers on that text alone
    rows = [c[1] for c in cases]
    padded = fm.logits(rows, every_position=True)
    for i, row in enumerate(rows):
        alone = reference_logits(recipe, model, [row], fm.pad_id)[0]
        np.testing.assert_allclose(padded[i, : len(row)], alone, atol=1e-4)


def test_result_shape_like_the_pipeline(mlm):
    recipe, fm, _, _ = mlm
    one = fm("大学で[MASK]の研究をしています", top_k=2)
    assert isinstance(one, list) and set(one[0]) == {"score", "token", "token_str", "sequence"}
    two = fm("[MASK]で[MASK]の研究をしています", top_k=2)
    assert len(two) == 2 and all(len(m) == 2 for m in two)
    many = fm(["大学で[MASK]の研究", "[MASK]は開かれる。"], top_k=2)
    assert len(many) == 2 and all(len(m) == 2 and isinstance(m[0], dict) for m in many)
    filled = one[0]
    assert "[MASK]" not in filled["sequence"]
    assert filled["sequence"] == fm.tokenizer.decode(
        [filled["token"] if t == fm.tokenizer.mask_id else t for t in fm.encode("大学で[MASK]の研究をしています")["input_ids"]]
    )


def test_encode_reports_the_inputs_the_graph_computes(mlm):
    """Positions and segments are computed inside the graph; `encode` reports them. Feeding
    exactly the reported ones to transformers must give the graph's logits."""
    recipe, fm, _, model = mlm
    enc = fm.encode("大学で[MASK]の研究をしています")
    n = len(enc["input_ids"])
    assert [enc["input_ids"][i] for i in enc["mask_positions"]] == [fm.tokenizer.mask_id]
    kwargs = {"input_ids": torch.tensor([enc["input_ids"]]), "attention_mask": torch.tensor([enc["attention_mask"]]),
              "position_ids": torch.tensor([enc["position_ids"]])}
    if "token_type_ids" in enc:
        kwargs["token_type_ids"] = torch.tensor([enc["token_type_ids"]])
    with torch.no_grad():
        expected = model(**kwargs).logits.numpy()[0]
    got = fm.logits([enc["input_ids"]], every_position=True)[0]
    assert got.shape == (n, expected.shape[-1])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rinna_card_example_layout(artifacts, twins_dir):
    """The card: tokenize "[CLS]" + the original text, replace token 5 by [MASK]."""
    fm = jaonnx.load(artifacts["rinna-roberta"])
    tok = hf_tokenizer(twins_dir / "rinna-roberta")
    tokens = tok.tokenize("[CLS]4年に1度オリンピックは開かれる。")
    card_ids = tok.convert_tokens_to_ids(tokens)
    card_ids[5] = tok.mask_token_id
    typed = typed_text(tokens, {5}, set(tok.all_special_tokens))
    assert fm.encode("[CLS]" + typed)["input_ids"] == card_ids
    assert fm.encode(typed)["input_ids"] == card_ids  # with or without the leading [CLS]
    assert card_ids[0] == 4 and tok.sep_token_id not in card_ids  # [CLS] first, no [SEP]


LATIN = ["AIはGPUで学習する。", "SLEとMRIとCTの検査", "Pythonで書いたAPIを公開した", "NHKのNewsを見た"]


def test_rinna_lower_cases_like_the_card(artifacts, twins_dir):
    """The card's tokenizer with do_lower_case (transformers 4's rule), on text with ASCII letters."""
    fm = jaonnx.load(artifacts["rinna-roberta"])
    tok = hf_tokenizer(twins_dir / "rinna-roberta")
    for text in LATIN:
        card_ids = tok.convert_tokens_to_ids(tok.tokenize(card_lower(tok, "[CLS]" + text)))
        assert fm.tokenizer.encode_masked(text) == card_ids, text
        assert fm.tokenizer.encode_masked("[CLS]" + text) == card_ids, text


def test_transformers_5_ignores_the_cards_do_lower_case(twins_dir):
    """Why the reference above applies transformers 4's rule itself: under transformers 5 the
    card's `tokenizer.do_lower_case = True` changes nothing, so upper-case stays upper-case."""
    tok = hf_tokenizer(twins_dir / "rinna-roberta")
    assert tok.tokenize("[CLS]AIとSLE") != tok.tokenize(card_lower(tok, "[CLS]AIとSLE"))


# Half-width katakana with dakuten/handakuten, ASCII letters, digits and spaces.
FULLWIDTH_CASES = ["ｶﾞｷﾞｸﾞ ﾊﾟﾋﾟﾌﾟ", "SLE 1ｶﾞ!", "CT 2024年 ﾃﾞｰﾀ", "abc XYZ 0123456789", "ｳﾞｧｲｵﾘﾝ (ﾊﾞｲｵﾘﾝ)"]
# Where mojimoji.han_to_zen differs, and what jaonnx does instead (see test below).
FULLWIDTH_DIFFERENCES = {
    '"': ("＂", "”"),  # ours: the full-width form of '"' (U+FF02); mojimoji: a closing curly quote
    "'": ("＇", "’"),
    "`": ("｀", "‘"),
    "¥": ("¥", "￥"),  # not ASCII: we leave it; mojimoji widens it
    "ﾜﾞ": ("ヷ", "ワ゛"),  # NFKC composes; mojimoji keeps a separate sound mark
}


def test_full_width_matches_mojimoji():
    """JMedRoBERTa's card asks for 全角 input; mojimoji.han_to_zen is the common independent
    implementation. They agree on katakana with (han)dakuten, ASCII letters, digits, spaces."""
    import mojimoji

    from jaonnx.tokenization import to_fullwidth

    for text in FULLWIDTH_CASES:
        assert to_fullwidth(text) == mojimoji.han_to_zen(text), text


def test_full_width_differences_from_mojimoji_are_the_recorded_ones():
    """We map each ASCII character to its own full-width form (U+FF01..FF5E), which is what the
    NFKC-normalizing tokenizers undo exactly; mojimoji picks typographic quotes. Recorded here."""
    import mojimoji

    from jaonnx.tokenization import to_fullwidth

    for text, (ours, theirs) in FULLWIDTH_DIFFERENCES.items():
        assert (to_fullwidth(text), mojimoji.han_to_zen(text)) == (ours, theirs), text


def test_jmedroberta_converts_to_full_width(artifacts, twins_dir):
    fm = jaonnx.load(artifacts["jmedroberta"])
    half = fm.encode("この患者はSLEと診断された。CT検査で[MASK]を認めた")["input_ids"]
    full = fm.encode("この患者はＳＬＥと診断された。ＣＴ検査で[MASK]を認めた")["input_ids"]
    assert half == full
    tok = hf_tokenizer(twins_dir / "jmedroberta")
    assert "ＳＬＥ" in "".join(tok.convert_ids_to_tokens(full))
    import mojimoji

    card = [tok.cls_token_id, *tok.encode(mojimoji.han_to_zen("この患者はSLEと診断された。CT検査で"), add_special_tokens=False)]
    assert half[: len(card)] == card


def test_plain_onnxruntime_without_positions_still_counts_from_zero(artifacts, twins_dir):
    """No way of running the rinna artifact reproduces transformers' padding_idx + 1 offset."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts["rinna-roberta"] / "model.onnx"), providers=["CPUExecutionProvider"])
    # positions are not an input at all: only the tokens, the mask and which logits to return
    assert sorted(i.name for i in session.get_inputs()) == ["attention_mask", "input_ids", "mask_positions"]
    fm = jaonnx.load(artifacts["rinna-roberta"])
    ids = np.array([fm.encode("4年に1度[MASK]は開かれる。")["input_ids"]])
    every = np.arange(ids.shape[1])[None]
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask_positions": every})
    model = hf_model(twins_dir / "rinna-roberta")
    with torch.no_grad():
        from_zero = model(torch.from_numpy(ids), position_ids=torch.arange(ids.shape[1])[None]).logits.numpy()
        offset = model(torch.from_numpy(ids)).logits.numpy()  # transformers' default: padding_idx + 1
    np.testing.assert_allclose(logits, from_zero, atol=1e-4)
    # the twin's position table is small, yet the offset is three orders of magnitude away
    assert np.abs(logits - offset).max() > max(1e-3, 100 * np.abs(logits - from_zero).max())


def test_fill_mask_cli_json(artifacts):
    import json

    from conftest import run_cli

    result = run_cli("fill-mask", str(artifacts["ken11-albert"]), "大学で[MASK]の研究をしています", "--top-k", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data) == 3 and data == jaonnx.load(artifacts["ken11-albert"])("大学で[MASK]の研究をしています", top_k=3)
