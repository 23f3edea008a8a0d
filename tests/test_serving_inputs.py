"""One input processor for Python and HTTP (per-prompt settings), streamed logprobs, and
`/tokenize` + `/detokenize` in llama.cpp's and vLLM's shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from helpers import hf_model

import jaonnx
from jaonnx.errors import JaonnxError
from serving_support import assert_json_error, need, running_server, sse_events

need("fastapi", "serve")
need("prometheus_client", "serve")

CARD = "rinna-gpt-1b"  # its card sets max_length = min_length = 100 (prompt included)
GPT = "gpt2-small-ja"
PROMPTS = ["東京は", "近年の機械学習は急速に進歩しており、今日では"]


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Any:
    with running_server([artifacts[GPT], artifacts[CARD], artifacts["rinna-roberta"]]) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c, app


@pytest.fixture(scope="module")
def card(artifacts: dict[str, Path]) -> Any:
    return jaonnx.load(artifacts[CARD])


@pytest.fixture(scope="module")
def gpt(artifacts: dict[str, Path]) -> Any:
    return jaonnx.load(artifacts[GPT])


# ---- one input processor --------------------------------------------------------------------
def test_http_resolves_settings_per_prompt_as_python(server: Any, card: Any) -> None:
    """With the card's max_length = min_length = 100, each prompt gets 100 - its own length new
    tokens, over HTTP as in Python (not the longest prompt's count for all)."""
    c, _ = server
    lengths = [len(card.encode(p)) for p in PROMPTS]
    assert lengths[0] != lengths[1]
    want = card.generate(PROMPTS, do_sample=False, return_ids=True)
    assert [len(w.generated_ids) for w in want] == [100 - n for n in lengths]
    r = c.post("/v1/generate", json={"model": CARD, "prompt": PROMPTS, "do_sample": False})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["generated_ids"] for g in got] == [w.generated_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]


def test_processed_prompts_carry_their_own_settings(card: Any) -> None:
    processed = card.process(PROMPTS, do_sample=False)
    assert [p.ids for p in processed] == [tuple(card.encode(p)) for p in PROMPTS]
    assert [p.settings.max_new_tokens for p in processed] == [100 - len(p.ids) for p in processed]
    engine = card.engine()
    rid = engine.add_request(processed[0])
    with pytest.raises(JaonnxError, match="pass no options") as err:
        engine.add_request(processed[1], max_new_tokens=3)
    assert err.value.field == "settings"
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid and out.prompt == PROMPTS[0]  # the caller's text, not re-decoded
    with pytest.raises(JaonnxError) as err:
        card.process([PROMPTS[0], "  "])
    assert err.value.field == "prompt[1]"


def test_http_names_the_prompt_at_fault(server: Any) -> None:
    c, _ = server
    assert_json_error(c.post("/v1/generate", json={"model": CARD, "prompt": [PROMPTS[0], " "]}), 400, "prompt[1]")
    assert_json_error(c.post("/v1/completions", json={"model": GPT, "prompt": "東京は" * 2000, "max_tokens": 2}),
                      400, "prompt")


# ---- streamed logprobs ----------------------------------------------------------------------
@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_non_streamed(server: Any, gpt: Any, twins_dir: Path, echo: bool) -> None:
    c, _ = server
    body = {"model": GPT, "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "logprobs": 3, "echo": echo}
    whole = c.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    want = whole.json()["choices"][0]
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert "".join(ch["text"] for ch in chunks) == want["text"]
    joined: dict[str, list[Any]] = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for ch in chunks:
        if ch["logprobs"] is not None:
            for k in joined:
                joined[k] += ch["logprobs"][k]
    assert joined == want["logprobs"]
    # and the generated tokens' logprobs are transformers' log-softmax
    ids = gpt.encode(PROMPTS[1])
    alone = gpt.generate(PROMPTS[1], max_new_tokens=10, do_sample=False, return_ids=True)
    with torch.no_grad():
        logits = hf_model(twins_dir / GPT)(torch.tensor([ids + alone.generated_ids])).logits[0].double()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    rows = np.arange(len(ids) - 1, len(ids) - 1 + len(alone.generated_ids))
    skip = len(ids) if echo else 0
    np.testing.assert_allclose(joined["token_logprobs"][skip:], ref[rows, alone.generated_ids], rtol=1e-4)
    if echo:
        np.testing.assert_allclose(joined["token_logprobs"][1:skip], ref[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)


def test_generate_stream_carries_logprobs(server: Any) -> None:
    c, _ = server
    body = {"model": GPT, "prompt": PROMPTS[0], "max_new_tokens": 6, "do_sample": False, "logprobs": 2}
    whole = c.post("/v1/generate", json=body).json()["results"][0]
    with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        events = sse_events(r)
    streamed = [lp for e in events[:-1] if "result" not in e for lp in e.get("logprobs", [])]
    assert streamed == whole["logprobs"] and len(streamed) == len(whole["generated_ids"])


# ---- /tokenize and /detokenize --------------------------------------------------------------
def test_tokenize_shapes_round_trip_and_agree_with_encode(server: Any, gpt: Any) -> None:
    c, _ = server
    text = PROMPTS[1]
    ids = gpt.encode(text)
    vllm = c.post("/tokenize", json={"model": GPT, "prompt": text, "return_token_strs": True}).json()
    assert vllm["tokens"] == ids and vllm["count"] == len(ids)
    assert vllm["max_model_len"] == gpt.manifest.max_positions
    assert vllm["token_strs"] == [gpt.tokenizer.token_str(t) for t in ids]
    llama = c.post("/tokenize", json={"model": GPT, "content": text, "with_pieces": True}).json()
    assert [t["id"] for t in llama["tokens"]] == ids
    back = c.post("/detokenize", json={"model": GPT, "tokens": ids}).json()
    assert back["content"] == back["prompt"] == gpt.decode(ids) == text


@pytest.mark.parametrize("path,body,status,field", [
    ("/tokenize", {"prompt": "東京は"}, 400, "model"),  # two generation models: name one
    ("/tokenize", {"model": GPT}, 400, "prompt"),
    ("/tokenize", {"model": GPT, "prompt": "a", "content": "b"}, 400, "content"),
    ("/tokenize", {"model": GPT, "prompt": "a", "add_special_tokens": False}, 400, "add_special_tokens"),
    ("/tokenize", {"model": "rinna-roberta", "prompt": "a"}, 400, "model"),
    ("/tokenize", {"model": GPT, "prompt": 3}, 422, "prompt"),
    ("/detokenize", {"model": GPT, "tokens": [1, 10**9]}, 400, "tokens[1]"),
    ("/detokenize", {"model": GPT, "tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_tokenize_errors_name_the_field(server: Any, path: str, body: Any, status: int, field: str) -> None:
    c, _ = server
    assert_json_error(c.post(path, json=body), status, field)


def test_tokenize_without_model_when_one_generator(artifacts: dict[str, Path], gpt: Any) -> None:
    with running_server([artifacts[GPT]], metrics=False) as (url, _):
        got = httpx.post(url + "/tokenize", json={"content": PROMPTS[0]}, timeout=60).json()
    assert got["tokens"] == gpt.encode(PROMPTS[0])


# ---- prompt_logprobs as an engine request ---------------------------------------------------
@pytest.mark.parametrize("name,layout", [(GPT, "static"), (CARD, "concat")])
def test_a_scoring_request_joins_a_running_batch(artifacts: dict[str, Path], twins_dir: Path, name: str,
                                                 layout: str) -> None:
    """A `prompt_logprobs` request joining mid-way scores its prompt as transformers does and
    leaves the running request's tokens as they are alone, on both KV layouts."""
    gen = jaonnx.load(artifacts[name])
    assert gen.manifest.decoder.kv_layout == layout
    alone = gen.generate(PROMPTS[1], max_new_tokens=12, min_new_tokens=12, do_sample=False, return_ids=True)
    engine = gen.engine()
    [running] = gen.process(PROMPTS[1], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    rid = engine.add_request(running)
    outs = engine.step() + engine.step()
    [scored] = gen.scoring_inputs(PROMPTS[1] + "今日は晴れ", 2)  # one token: needs no cache
    [echoed] = gen.process(PROMPTS[1] + "今日は晴れ", max_new_tokens=3, do_sample=False, prompt_logprobs=2)  # joins
    sid, eid = engine.add_request(scored), engine.add_request(echoed)
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [t for o in outs if o.request_id == rid for t in o.new_token_ids] == alone.generated_ids
    ids = list(scored.ids)
    with torch.no_grad():
        logits = hf_model(twins_dir / name)(torch.tensor([ids])).logits[0, :-1].double()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    for request_id in (sid, eid):
        [first] = [o for o in outs if o.request_id == request_id and o.prompt_logprobs is not None]
        np.testing.assert_allclose([lp.logprob for lp in first.prompt_logprobs],
                                   ref[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)
        assert all(len(lp.top) == 2 and lp.top[0][1] == pytest.approx(ref[i].max(), rel=1e-4)
                   for i, lp in enumerate(first.prompt_logprobs))
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == eid) == 3


def test_generate_returns_prompt_logprobs_when_asked(server: Any, gpt: Any, twins_dir: Path) -> None:
    c, _ = server
    r = c.post("/v1/generate", json={"model": GPT, "prompt": PROMPTS[1], "max_new_tokens": 2, "do_sample": False,
                                     "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    ids = gpt.encode(PROMPTS[1])
    with torch.no_grad():
        logits = hf_model(twins_dir / GPT)(torch.tensor([ids])).logits[0, :-1].double()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    got = result["prompt_logprobs"]
    assert [e["token_id"] for e in got] == ids[1:]
    np.testing.assert_allclose([e["logprob"] for e in got], ref[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)
    assert all(len(e["top"]) == 2 for e in got)
    plain = c.post("/v1/generate", json={"model": GPT, "prompt": PROMPTS[1], "max_new_tokens": 2}).json()
    assert "prompt_logprobs" not in plain["results"][0]
    assert_json_error(c.post("/v1/generate", json={"model": GPT, "prompt": "x", "prompt_logprobs": 21}), 422,
                      "prompt_logprobs")
