"""Scoring: `TextGenerator.prompt_logprobs`, `POST /v1/score` and `/v1/completions` with
`echo` + `logprobs` all equal transformers' log-softmax of the twin's logits (rel 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from helpers import hf_model, one_token_text

import jaonnx
from jaonnx.errors import JaonnxError
from serving_support import assert_json_error, need, running_server

need("fastapi", "serve")
need("prometheus_client", "serve")

GPT = ["gpt2-small-ja", "rinna-gpt-1b"]
TEXTS = ["近年の機械学習は急速に進歩している。", "東京は日本の首都です。"]
K = 3


@pytest.fixture(scope="module", params=GPT)
def pair(request: pytest.FixtureRequest, artifacts: dict[str, Path], twins_dir: Path) -> Any:
    return request.param, jaonnx.load(artifacts[request.param]), hf_model(twins_dir / request.param)


def reference(model: Any, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax of the logits predicting ids[1:], float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_prompt_logprobs_match_transformers(pair: Any) -> None:
    _, gen, model = pair
    for text in TEXTS:
        got = gen.prompt_logprobs(text, top_k=K)
        ids = gen.encode(text)
        want = reference(model, ids)
        assert got.ids == ids
        np.testing.assert_allclose(got.token_logprobs, want[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)
        assert got.token_logprobs == pytest.approx(gen.score(text).token_logprobs, rel=1e-12)  # one computation
        for i, top in enumerate(got.top_logprobs):
            order = np.argsort(-want[i])[:K]
            assert list(top) == order.tolist() or sorted(top.values(), reverse=True) == pytest.approx(
                want[i][order].tolist(), rel=1e-4)  # ties may swap ids, never values
            assert list(top.values()) == pytest.approx(want[i][list(top)].tolist(), rel=1e-4)
        assert "".join(got.tokens) == gen.tokenizer.decode(ids)
        assert [got.text_offset[i + 1] - got.text_offset[i] for i in range(len(ids) - 1)] == [
            len(t) for t in got.tokens[:-1]]


def test_prompt_logprobs_errors(artifacts: dict[str, Path]) -> None:
    gen = jaonnx.load(artifacts["gpt2-small-ja"])
    with pytest.raises(JaonnxError, match="top_k"):
        gen.prompt_logprobs(TEXTS[0], top_k=-1)
    with pytest.raises(JaonnxError, match="empty prompt"):
        gen.prompt_logprobs("  ")


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Any:
    with running_server([artifacts["gpt2-small-ja"], artifacts["rinna-roberta"]]) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def gpt2(artifacts: dict[str, Path], twins_dir: Path) -> Any:
    return jaonnx.load(artifacts["gpt2-small-ja"]), hf_model(twins_dir / "gpt2-small-ja")


def test_score_endpoint_matches_transformers(server: Any, gpt2: Any) -> None:
    url, _ = server
    gen, model = gpt2
    r = httpx.post(url + "/v1/score", json={"model": "gpt2-small-ja", "input": TEXTS, "top_logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    total = 0
    for text, d in zip(TEXTS, body["data"]):
        ids = gen.encode(text)
        want = reference(model, ids)
        token_lp = want[np.arange(len(ids) - 1), ids[1:]]
        assert d["text"] == text and d["num_tokens"] == len(ids) - 1
        np.testing.assert_allclose(d["token_logprobs"], token_lp, rtol=1e-4)
        assert d["log_likelihood"] == pytest.approx(token_lp.sum(), rel=1e-4)
        assert d["perplexity"] == pytest.approx(float(np.exp(-token_lp.mean())), rel=1e-4)
        assert len(d["top_logprobs"]) == len(ids) - 1
        for i, top in enumerate(d["top_logprobs"]):
            assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(want[i])[::-1][: len(top)], rel=1e-4)
        total += len(ids)
    assert body["usage"] == {"prompt_tokens": total, "total_tokens": total}
    single = httpx.post(url + "/v1/score", json={"model": "gpt2-small-ja", "input": TEXTS[0]}, timeout=60).json()
    assert "top_logprobs" not in single["data"][0]
    assert single["data"][0]["log_likelihood"] == pytest.approx(body["data"][0]["log_likelihood"], rel=1e-9)


def test_echo_logprobs_match_transformers(server: Any, gpt2: Any) -> None:
    url, _ = server
    gen, model = gpt2
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "gpt2-small-ja", "prompt": TEXTS, "max_tokens": 0, "echo": True, "logprobs": K})
    assert r.status_code == 200, r.text
    body = r.json()
    for text, choice in zip(TEXTS, body["choices"]):
        ids = gen.encode(text)
        want = reference(model, ids)
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], want[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(ids)
        assert "".join(lp["tokens"]) == gen.tokenizer.decode(ids)
        for i, top in enumerate(lp["top_logprobs"][1:]):
            assert len(top) <= K
            assert max(top.values()) == pytest.approx(want[i].max(), rel=1e-4)
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == sum(len(gen.encode(t)) for t in TEXTS)
    plain = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "gpt2-small-ja", "prompt": TEXTS[0], "max_tokens": 0, "echo": True}).json()
    assert plain["choices"][0]["text"] == TEXTS[0] and plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("echo", [False, True])
def test_generated_token_logprobs_match_transformers(server: Any, gpt2: Any, echo: bool) -> None:
    """`/v1/completions` with `logprobs` on generated tokens: each equals transformers'
    log-softmax at that position, the top-k start with the greedy pick, offsets index the text."""
    url, _ = server
    gen, model = gpt2
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "gpt2-small-ja", "prompt": TEXTS[1], "max_tokens": 8, "temperature": 0, "logprobs": K, "echo": echo})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_ids = gen.encode(TEXTS[1])
    alone = gen.generate(TEXTS[1], max_new_tokens=8, do_sample=False, return_ids=True)
    ids = prompt_ids + alone.generated_ids
    want = reference(model, ids + [0])  # row j predicts ids[j + 1]
    skip = len(prompt_ids) if echo else 0
    got = lp["token_logprobs"][skip:]
    assert len(got) == len(alone.generated_ids)
    rows = np.arange(len(prompt_ids) - 1, len(ids) - 1)
    np.testing.assert_allclose(got, want[rows, ids[len(prompt_ids):]], rtol=1e-4)
    for j, top in enumerate(lp["top_logprobs"][skip:]):
        assert len(top) == K and max(top.values()) == pytest.approx(got[j], rel=1e-6)  # greedy takes the best
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    if echo:
        assert lp["token_logprobs"][0] is None and choice["text"].startswith(TEXTS[1])


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/score", {"model": "gpt2-small-ja", "input": ["東京は日本の首都です。", "  "]}, 400, "input[1]"),
    ("/v1/score", {"model": "gpt2-small-ja", "input": []}, 422, "input"),
    ("/v1/score", {"model": "gpt2-small-ja", "input": "東京は", "top_logprobs": 21}, 422, "top_logprobs"),
    ("/v1/score", {"model": "rinna-roberta", "input": "東京は"}, 400, "model"),
    ("/v1/score", {"model": "nope", "input": "東京は"}, 404, "model"),
    ("/v1/score", {"model": "gpt2-small-ja", "input": "東京は" * 2000}, 400, "input"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 0, "echo": True,
                         "stream": True}, 400, "stream"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 0, "echo": True,
                         "logprobs": 6}, 422, "logprobs"),
    ("/v1/completions", {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 0, "echo": True,
                         "suffix": "。"}, 400, "suffix"),
])
def test_scoring_errors(server: Any, path: str, body: Any, status: int, field: str) -> None:
    url, _ = server
    assert_json_error(httpx.post(url + path, json=body, timeout=60), status, field)


def test_one_token_texts(server: Any, gpt2: Any) -> None:
    """Nothing to score: /v1/score says so (400); an echo gives the token with a None logprob."""
    url, _ = server
    prompt = one_token_text(gpt2[0])
    assert_json_error(httpx.post(url + "/v1/score", json={"model": "gpt2-small-ja", "input": prompt}), 400, "input")
    lp = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "gpt2-small-ja", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None] and lp["top_logprobs"] == [None] and lp["text_offset"] == [0]


def test_scoring_runs_on_the_worker_not_the_event_loop(artifacts: dict[str, Path], twins_dir: Path) -> None:
    """While a long echo + logprobs completion is computed, `/health` still answers at once:
    its slowest answer meanwhile stays under a fifth of the completion's own time (on the
    event loop it would wait for the whole forward). The echo logprobs equal transformers'."""
    import threading
    import time

    big = "rinna-gpt-1b"  # the 24-layer twin: a long prompt takes a while to score
    prompt = "東京は日本の首都です。" * 60
    body = {"model": big, "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 5}
    with running_server([artifacts[big]]) as (url, _), httpx.Client(base_url=url, timeout=120) as c:
        c.post("/v1/completions", json={**body, "prompt": "東京は", "max_tokens": 1})  # warm up
        done, answer = threading.Event(), {}

        def complete() -> None:
            started = time.perf_counter()
            answer["response"] = c.post("/v1/completions", json=body)
            answer["seconds"] = time.perf_counter() - started
            done.set()

        thread = threading.Thread(target=complete)
        thread.start()
        health = []
        while not done.is_set():
            started = time.perf_counter()
            assert c.get("/health").status_code == 200
            health.append(time.perf_counter() - started)
            time.sleep(0.005)
        thread.join()
    r = answer["response"]
    assert r.status_code == 200, r.text
    assert len(health) >= 5, (health, answer["seconds"])  # /health kept answering while it ran
    assert max(health) < answer["seconds"] / 5, (max(health), answer["seconds"])
    lp = r.json()["choices"][0]["logprobs"]
    ids = jaonnx.load(artifacts[big]).encode(prompt)
    want = reference(hf_model(twins_dir / big), ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4)


def test_more_texts_than_a_batch_are_scored_in_parts(artifacts: dict[str, Path], gpt2: Any) -> None:
    """`/v1/score` and echo scoring take more texts than `max_batch_size`: they run in parts."""
    gen, model = gpt2
    items = [f"{i}番目の文は東京です。" for i in range(5)]
    with running_server([artifacts["gpt2-small-ja"]], max_batch_size=2) as (url, _):
        score = httpx.post(url + "/v1/score", json={"model": "gpt2-small-ja", "input": items}, timeout=60)
        echo = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "gpt2-small-ja", "prompt": items, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert score.status_code == 200 and echo.status_code == 200, (score.text, echo.text)
    for text, d, choice in zip(items, score.json()["data"], echo.json()["choices"]):
        ids = gen.encode(text)
        want = reference(model, ids)[np.arange(len(ids) - 1), ids[1:]]
        assert d["text"] == text == choice["text"]
        np.testing.assert_allclose(d["token_logprobs"], want, rtol=1e-4)
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], want, rtol=1e-4)
