"""Reliability (b): hypothesis-generated bad requests against every endpoint get a 4xx JSON
error naming a field, never a 5xx or a hang, and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_support import assert_json_error, need, running_server

need("fastapi", "serve")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID = {
    "/v1/fill-mask": {"model": "rinna-roberta", "inputs": "東京は[MASK]です。", "top_k": 2},
    "/v1/generate": {"model": "gpt2-small-ja", "prompt": "東京は", "max_new_tokens": 2, "do_sample": False},
    "/v1/completions": {"model": "gpt2-small-ja", "prompt": "東京は", "max_tokens": 2, "temperature": 0},
}
# Values of the wrong type (or out of range) for each field, which no endpoint may accept.
STRINGS = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers(), min_size=1),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BAD_VALUES: dict[str, Any] = {
    "model": st.one_of(STRINGS.filter(lambda v: v is not None), st.text(max_size=30).filter(
        lambda s: s not in ("rinna-roberta", "gpt2-small-ja"))),
    "inputs": st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.just([]),
                        st.text(max_size=30).filter(lambda s: "[MASK]" not in s),
                        st.lists(st.one_of(st.integers(), st.none()), min_size=1, max_size=3)),
    "prompt": st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.just([]),
                        st.text(alphabet=" \t\n\r", max_size=5), st.lists(st.integers(), min_size=1, max_size=3)),
    "top_k": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans()),
    "max_new_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=100_000), st.floats(),
                                st.text(max_size=3), st.booleans()),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=100_000), st.floats(),
                            st.text(max_size=3), st.booleans()),
    "temperature": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=3.0), st.just(float("nan")),
                             st.text(max_size=3), st.booleans()),
    "do_sample": st.one_of(st.integers(), st.text(max_size=3), st.floats()),
}
FIELDS = {path: sorted(set(body) & set(BAD_VALUES)) for path, body in VALID.items()}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=["no auth", "auth"])
def client(artifacts: dict[str, Path], request: pytest.FixtureRequest) -> Any:
    """The server as is, and with an API key required (the client sends it): bad bodies must
    still be a 4xx naming their field once the key check has passed."""
    dirs = [artifacts["rinna-roberta"], artifacts["gpt2-small-ja"]]
    keys = ("fuzz-key-1",) if request.param == "auth" else ()
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    with running_server(dirs, max_body_bytes=4096, request_timeout=20, api_keys=keys) as (url, _):
        with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
            yield c


def post(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"content-type": "application/json"})


def field_mutation(path: str) -> st.SearchStrategy[tuple[dict[str, Any], str]]:
    """The valid body with one field given a bad value, or dropped (if required), or an extra one."""
    def mutate(name: str) -> st.SearchStrategy[tuple[dict[str, Any], str]]:
        return BAD_VALUES[name].map(lambda v: ({**VALID[path], name: v}, name))

    dropped = st.sampled_from(["model", "inputs" if path == "/v1/fill-mask" else "prompt"]).map(
        lambda name: ({k: v for k, v in VALID[path].items() if k != name}, name))
    extra = st.text(min_size=1, max_size=10).filter(lambda k: k not in VALID[path] and k.isidentifier()).map(
        lambda k: ({**VALID[path], f"x_{k}": 1}, f"x_{k}"))
    return st.one_of(*[mutate(n) for n in FIELDS[path]], dropped, extra)


@pytest.mark.parametrize("path", sorted(VALID))
def test_valid_bodies_are_served(client: httpx.Client, path: str) -> None:
    assert client.post(path, json=VALID[path]).status_code == 200  # so the mutations below are what fails


@pytest.mark.parametrize("path", sorted(VALID))
def test_bad_fields_get_a_4xx_naming_them(client: httpx.Client, path: str) -> None:
    @SETTINGS
    @given(field_mutation(path))
    def check(case: tuple[dict[str, Any], str]) -> None:
        body, name = case
        content = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
        error = assert_json_error(post(client, path, content))
        assert error["field"] is not None and error["field"].split("[")[0] in (name, "body"), (error, name)

    check()


@pytest.mark.parametrize("path", sorted(VALID))
def test_garbage_bodies_get_a_4xx(client: httpx.Client, path: str) -> None:
    junk_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                             lambda inner: st.lists(inner, max_size=3), max_leaves=8)
    bodies = st.one_of(
        st.binary(max_size=200),
        junk_json.map(lambda v: json.dumps(v).encode()),  # JSON, but never an object
        st.binary(min_size=1, max_size=50).map(lambda b: b"{" + b),
        st.just(b"\xff" * 10), st.just(b'{"model": "' + b"\xc3\x28" + b'"}'),
        st.integers(min_value=4097, max_value=20_000).map(lambda n: b'{"model": "' + b"a" * n + b'"}'),
    )

    @SETTINGS
    @given(bodies)
    def check(content: bytes) -> None:
        assert_json_error(post(client, path, content))

    check()
    assert client.post(path, json=VALID[path]).status_code == 200  # and it still serves


ASCII = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@pytest.mark.parametrize("path", sorted(VALID))
def test_authorization_headers(client: httpx.Client, path: str) -> None:
    """With a key required, any other Authorization header is a 401 JSON error; without
    one, the header is ignored."""
    if "authorization" not in client.headers:
        for value in ("Bearer wrong", "Basic abc", ""):
            assert client.post(path, json=VALID[path], headers={"Authorization": value}).status_code == 200
        return

    @SETTINGS
    @given(st.one_of(ASCII, ASCII.map(lambda k: f"Bearer {k}"), st.just("Bearer"), st.just("bearer fuzz-key-1x"),
                     st.just("Basic fuzz-key-1"), st.just("Bearer fuzz-key-")))
    def check(value: str) -> None:
        value = value.strip()  # HTTP header values carry no outer whitespace
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip() == "fuzz-key-1":
            return  # the right key, however spaced
        r = client.post(path, json=VALID[path], headers={"Authorization": value})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (value, r.text[:200])

    check()
