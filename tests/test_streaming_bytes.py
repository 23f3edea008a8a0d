"""The streaming detokenizer and stop strings on a byte-fallback tokenizer.

The `gpt2-bytes` test twin's sentencepiece model spells characters it never saw as <0xNN>
byte pieces, and its model has memorized BYTE_LINES (emoji, rare kanji, a 4-byte kanji), so
greedy decoding writes known characters out byte by byte. The expected texts below are those
hand-written lines, not anything this code produced before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ensure_twin, export_via_cli

import jaonnx
from jaonnx.generation import RequestOutput
from jaonnx.generation.streaming import REPLACEMENT, IncrementalText
from jaonnx_export.twins.build import BYTE_LINES

PROMPT = "今日の夕食は"
LINE = BYTE_LINES[0]  # "今日の夕食は🍣と鱚の天ぷらで、𠮷野さんも来た。"
CONT = LINE[len(PROMPT):]  # 🍣 (4 byte pieces) と 鱚 (3) の天ぷらで、 𠮷 (4) 野さんも来た。
CONT_TOKENS = 25  # 4 + 1 + 3 + 6 + 4 + 7: the continuation up to and including "。"
HELD = 3 + 2 + 3  # byte pieces that leave their character incomplete


@pytest.fixture(scope="module")
def artifact(test_twins_dir: Path, cache_dir: Path) -> Path:
    twin = ensure_twin(test_twins_dir, "gpt2-bytes")
    return export_via_cli(twin, cache_dir / "artifacts" / "gpt2-bytes")


@pytest.fixture(scope="module")
def gen(artifact: Path):
    return jaonnx.load(artifact)


def run(gen, prompt: str = PROMPT, **options) -> tuple[list[RequestOutput], RequestOutput]:
    """Every step's output of one request through the engine, and the final one."""
    options = {"do_sample": False, "max_new_tokens": CONT_TOKENS, **options}
    engine = gen.engine(max_batch_size=2)
    engine.add_request(prompt, request_id="r", **options)
    outs: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert outs[-1].finished
    return outs, outs[-1]


def is_byte(gen, token_id: int) -> bool:
    return gen.tokenizer.backend.id_to_piece(token_id).startswith("<0x")


def assert_clean_stream(outs: list[RequestOutput], expected: str) -> None:
    """Pieces join to the expected text; every prefix of the stream is a prefix of it (nothing
    later cut, such as a stop string's start, was ever shown); no piece has U+FFFD."""
    shown = ""
    for out in outs:
        assert REPLACEMENT not in out.new_text, (out.new_text, out.new_token_ids)
        shown += out.new_text
        assert expected.startswith(shown), (shown, expected)
    assert shown == expected == outs[-1].text


def test_the_twin_spells_unseen_characters_in_bytes(gen):
    ids = gen.encode(LINE)
    assert sum(is_byte(gen, t) for t in ids) == 4 + 3 + 4
    assert gen.decode(ids) == LINE
    _, final = run(gen)
    assert final.text == CONT and len(final.token_ids) == CONT_TOKENS
    assert sum(is_byte(gen, t) for t in final.token_ids) == 4 + 3 + 4


def test_incomplete_characters_are_held_back(gen):
    outs, final = run(gen)
    assert_clean_stream(outs, CONT)
    held = [o for o in outs if o.new_token_ids and not o.new_text]
    assert len(held) == HELD
    assert all(is_byte(gen, t) for o in held for t in o.new_token_ids)
    assert final.finish_reason == "length"


def test_incremental_text_against_whole_decode(gen):
    """The detokenizer fed one token at a time, on every byte line and corpus lines: pieces
    join to the whole decode and never hold U+FFFD."""
    from jaonnx_export.corpus import heldout_lines

    for line in [*BYTE_LINES, *heldout_lines()[:20]]:
        ids = gen.encode(line)
        for cut in (1, 2, 3, 5):
            if REPLACEMENT in gen.decode(ids[:cut]):
                continue  # a prompt that ends inside a character: no text to continue from
            detok = IncrementalText(gen.decode, ids[:cut])
            pieces = [detok.push([t]) for t in ids[cut:]] + [detok.finish()]
            assert all(REPLACEMENT not in p for p in pieces), line
            assert "".join(pieces) == gen.decode(ids)[len(gen.decode(ids[:cut])):], line


def test_a_length_cut_inside_a_character_flushes_it_once_at_the_end(gen):
    """Cut after 2 of 🍣's 4 bytes: generate() returns the replacement character, and the
    stream shows it once, in the last piece, as non-streamed text does."""
    outs, final = run(gen, max_new_tokens=2)
    assert final.finish_reason == "length"
    assert final.text == gen.generate(PROMPT, do_sample=False, max_new_tokens=2)
    assert final.text.endswith(REPLACEMENT)
    assert "".join(o.new_text for o in outs) == final.text
    assert all(REPLACEMENT not in o.new_text for o in outs[:-1])


STOP_CASES = {
    # name: (stop strings, max_new_tokens, expected text)
    "straddles two tokens": (["天ぷ"], CONT_TOKENS, "🍣と鱚の"),
    "straddles byte pieces": (["鱚"], CONT_TOKENS, "🍣と"),
    "straddles a piece and bytes": (["と鱚"], CONT_TOKENS, "🍣"),
    "4-byte char after a comma": (["、𠮷"], CONT_TOKENS, "🍣と鱚の天ぷらで"),
    "at position 0": (["🍣"], CONT_TOKENS, ""),
    "at position 0, longer": (["🍣と鱚の天"], CONT_TOKENS, ""),
    "on the final token": (["来た。"], CONT_TOKENS, CONT[: CONT.index("来た。")]),
    "on the final byte": (["𠮷"], 4 + 1 + 3 + 6 + 4, "🍣と鱚の天ぷらで、"),
    "several lengths, longest first in text": (["野さん", "と鱚の天ぷらで", "。"], CONT_TOKENS, "🍣"),
    "several lengths, shortest first in text": (["ぷ", "𠮷野さんも来", "🐟"], CONT_TOKENS, "🍣と鱚の天"),
}


@pytest.mark.parametrize("case", sorted(STOP_CASES))
def test_stop_strings(gen, case):
    stops, n, expected = STOP_CASES[case]
    outs, final = run(gen, stop=stops, max_new_tokens=n)
    assert final.finish_reason == "stop", (case, final.finish_reason)
    assert_clean_stream(outs, expected)
    assert not any(s in o.new_text for s in stops for o in outs)


@pytest.mark.parametrize("stops", [["天ぷらX"], ["🍣と鱚X"], ["鱚を"], ["𠮷野さんも来た。 X"]])
def test_a_stop_prefix_that_never_completes_is_released(gen, stops):
    """Held back while it might be a stop string, then shown: the whole text, "length"."""
    outs, final = run(gen, stop=stops)
    assert final.finish_reason == "length"
    assert_clean_stream(outs, CONT)


STREAM_CASES = [
    dict(do_sample=False, max_new_tokens=CONT_TOKENS),
    dict(do_sample=False, max_new_tokens=CONT_TOKENS, stop=["と鱚"]),
    dict(do_sample=False, max_new_tokens=CONT_TOKENS, stop=["来た。"]),
    dict(do_sample=False, max_new_tokens=3),
    dict(do_sample=True, seed=5, temperature=1.2, top_k=0, max_new_tokens=40),
    dict(do_sample=True, seed=6, temperature=1.5, top_k=0, max_new_tokens=40, stop=["の", "🍣"]),
]


@pytest.mark.parametrize("options", STREAM_CASES)
def test_streamed_equals_non_streamed_in_python(gen, options):
    want = gen.generate(PROMPT, num_return_sequences=1, **options)
    pieces = list(gen.stream(PROMPT, num_return_sequences=1, **options))
    assert "".join(pieces) == want
    assert all(pieces)


def test_streamed_equals_non_streamed_over_http(artifact: Path, gen):
    from serving_support import need, running_server, sse_events

    need("fastapi", "serve")
    import httpx
    with running_server([artifact], max_batch_size=4, max_wait_ms=5, request_timeout=60) as (url, _app), \
            httpx.Client(base_url=url, timeout=60) as client:
        (model,) = [m["id"] for m in client.get("/v1/models").json()["data"]]
        for options in STREAM_CASES:
            body = {"model": model, "prompt": PROMPT, "num_return_sequences": 1, **options}
            plain = client.post("/v1/generate", json=body)
            assert plain.status_code == 200, plain.text
            result = plain.json()["results"][0]
            assert result["text"] == gen.generate(PROMPT, num_return_sequences=1, **options)
            with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events(r)
            pieces = [e["text"] for e in events[:-1] if "result" not in e]
            assert "".join(pieces) == result["text"], options
            if not options["do_sample"]:
                assert all(REPLACEMENT not in p for p in pieces[:-1])
            assert events[-2]["result"]["finish_reason"] == result["finish_reason"]
            completion = client.post("/v1/completions", json={
                "model": model, "prompt": PROMPT, "max_tokens": options["max_new_tokens"], "temperature": 0,
                **({"stop": options["stop"]} if "stop" in options else {})})
            if not options["do_sample"]:
                assert completion.json()["choices"][0]["text"] == result["text"]
                with client.stream("POST", "/v1/completions", json={
                        "model": model, "prompt": PROMPT, "max_tokens": options["max_new_tokens"], "temperature": 0,
                        "stream": True, **({"stop": options["stop"]} if "stop" in options else {})}) as r:
                    chunks = [e for e in sse_events(r) if e != "[DONE]"]
                assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == result["text"]
