"""Structured output over HTTP: `/v1/generate`'s options and `/v1/completions`' OpenAI
`response_format` and vLLM `structured_outputs` / `guided_*` fields, streamed and not; each bad
input is a 400 naming its field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving_support import assert_json_error, need, running_server, sse_events
from structured_support import NESTED_SCHEMA, with_byte_fallback

need("fastapi", "serve")
need("llguidance", "structured")
jsonschema = need("jsonschema", "dev")
httpx = need("httpx", "dev")

MODEL = "gpt2-small-ja-bytes"
PROMPT = "人物のデータ:"


@pytest.fixture(scope="module")
def client(artifacts: dict[str, Path], cache_dir: Path) -> Iterator[Any]:
    art = with_byte_fallback(artifacts["gpt2-small-ja"], cache_dir / "artifacts" / MODEL)
    with running_server([art]) as (url, _), httpx.Client(base_url=url, timeout=120) as c:
        yield c


def completion(client: Any, **body: Any) -> Any:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "seed": 1, **body})


def streamed_text(client: Any, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e.get("choices") or "text" in e]
    text = "".join(c["choices"][0]["text"] if "choices" in c else c.get("text", "") for c in chunks)
    return text, events


@pytest.mark.parametrize("fmt", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": NESTED_SCHEMA}}},
    {"structured_outputs": {"json": NESTED_SCHEMA}},
    {"guided_json": NESTED_SCHEMA},
    {"guided_json": json.dumps(NESTED_SCHEMA)},
])
def test_completions_json_schema_spellings(client: Any, fmt: dict[str, Any]) -> None:
    r = completion(client, n=3, **fmt)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), NESTED_SCHEMA)


def test_completions_json_object(client: Any) -> None:
    r = completion(client, temperature=0, max_tokens=60, response_format={"type": "json_object"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    else:
        assert choice["finish_reason"] == "length" and choice["text"].startswith("{")


def test_completions_regex_choice_grammar(client: Any) -> None:
    r = completion(client, n=4, guided_regex=r"\d{3}-\d{4}")
    assert all(re.fullmatch(r"\d{3}-\d{4}", c["text"]) for c in r.json()["choices"]), r.text
    r = completion(client, n=4, structured_outputs={"choice": ["東京", "大阪"]})
    assert {c["text"] for c in r.json()["choices"]} <= {"東京", "大阪"}, r.text
    r = completion(client, n=2, guided_choice=["はい", "いいえ"])
    assert {c["text"] for c in r.json()["choices"]} <= {"はい", "いいえ"}, r.text
    r = completion(client, guided_grammar='root ::= "答え:" ("はい" | "いいえ")')
    assert r.json()["choices"][0]["text"] in ("答え:はい", "答え:いいえ"), r.text


def test_completions_streamed_json_is_valid(client: Any) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "seed": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": NESTED_SCHEMA}}}
    text, events = streamed_text(client, "/v1/completions", body)
    jsonschema.validate(json.loads(text), NESTED_SCHEMA)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert text == completion(client, **{k: v for k, v in body.items() if k not in ("model", "prompt")}).json()["choices"][0]["text"]


def test_generate_takes_the_options_streamed_and_not(client: Any) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 120, "do_sample": True, "seed": 3,
            "num_return_sequences": 1, "json_schema": NESTED_SCHEMA}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["constraint"] == "satisfied" and result["finish_reason"] == "stop"
    jsonschema.validate(json.loads(result["text"]), NESTED_SCHEMA)
    text, _ = streamed_text(client, "/v1/generate", body)
    assert text == result["text"]
    r = client.post("/v1/generate", json={**body, "json_schema": None, "choice": ["はい", "いいえ"]})
    assert r.json()["results"][0]["text"] in ("はい", "いいえ"), r.text


def test_incomplete_output_says_so(client: Any) -> None:
    r = client.post("/v1/generate", json={"model": MODEL, "prompt": PROMPT, "max_new_tokens": 4, "do_sample": False,
                                          "json_schema": NESTED_SCHEMA})
    result = r.json()["results"][0]
    assert (result["finish_reason"], result["constraint"]) == ("length", "incomplete")
    r = completion(client, max_tokens=4, guided_json=NESTED_SCHEMA)
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": "text"}}, "response_format"),
    ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"guided_json": "{oops"}, "guided_json"),
    ("/v1/completions", {"structured_outputs": {"xml": "a"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "(", "choice": ["a"]}}, "structured_outputs"),
    ("/v1/completions", {"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ("/v1/generate", {"json_schema": {"type": "nonsense"}}, "json_schema"),
    ("/v1/generate", {"regex": "a", "choice": ["a"]}, "choice"),
    ("/v1/generate", {"grammar": "root ::= ("}, "grammar"),
])
def test_bad_constraints_are_400_naming_the_field(client: Any, path: str, body: dict[str, Any], field: str) -> None:
    r = client.post(path, json={"model": MODEL, "prompt": PROMPT, **body})
    error = assert_json_error(r, 400, field)
    assert "\n" not in error["message"]
